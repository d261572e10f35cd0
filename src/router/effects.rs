//! What a statement may do to the session beyond its own result: change
//! settings, pin the backend (LISTEN, temp tables, SQL PREPARE, …), drop
//! server-side prepared statements. Read from the statement's words; the
//! session acts on it (pinning, replaying SETs, re-creating statements).

/// What a statement may do to the session, found in one pass over its
/// words (identifiers and keywords, compared whole and case-insensitively).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StatementEffects {
    /// SET / RESET / DISCARD: session settings may change.
    pub sets: bool,
    /// Effects that outlive the transaction on this backend: LISTEN, temp
    /// tables, SQL PREPARE, WITH HOLD cursors, session advisory locks,
    /// set_config, SESSION AUTHORIZATION, dblink. The backend is pinned.
    pub taints: bool,
    /// DISCARD ALL / DEALLOCATE: server-side prepared statements are gone.
    pub drops_statements: bool,
    /// DISCARD ALL: every session-scoped effect is undone.
    pub discards_all: bool,
    /// Reads `pg_prepared_statements`, answered from the client's own
    /// statements (`prepared_view`).
    pub reads_prepared_view: bool,
}

/// Bytes that make up identifiers and keywords.
const WORD: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || c == b'_';
        b += 1;
    }
    table
};

/// First letters (lower case) of the keywords `scan_statement` looks for.
const INTERESTING_START: [bool; 256] = {
    let mut table = [false; 256];
    let letters = b"srdalthpc";
    let mut i = 0;
    while i < letters.len() {
        table[letters[i] as usize] = true;
        i += 1;
    }
    table
};

/// The effects of `sql`: its words everywhere, strings, dollar quotes and
/// comments included (a `DO` body can create a temp table).
pub fn scan_statement(sql: &str) -> StatementEffects {
    let mut effects = StatementEffects::default();
    let mut previous: &[u8] = b"";
    let mut deallocate = false;
    let bytes = sql.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if !WORD[bytes[i] as usize] {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && WORD[bytes[i] as usize] {
            i += 1;
        }
        let word = &bytes[start..i];
        // Most words start with a letter no keyword of interest starts with.
        if !INTERESTING_START[(word[0] | 0x20) as usize] {
            previous = word;
            continue;
        }
        let is = |w: &[u8]| word.eq_ignore_ascii_case(w);
        match word.first().map(|b| b | 0x20) {
            Some(b's') if is(b"set") => effects.sets = true,
            // asyncpg turns `jit` off around every type introspection with
            // set_config('jit', …, false): a planner knob whose value cannot
            // change a result, so it does not pin the backend.
            Some(b's') if is(b"set_config") && !sets_jit(&bytes[i..]) => effects.taints = true,
            Some(b'r') if is(b"reset") => effects.sets = true,
            Some(b'd') if is(b"discard") => effects.sets = true,
            Some(b'd') if is(b"deallocate") => deallocate = true,
            Some(b'd') if is(b"dblink") || is(b"dblink_connect") => effects.taints = true,
            Some(b'a') if is(b"all") && previous.eq_ignore_ascii_case(b"discard") => {
                effects.discards_all = true;
                effects.drops_statements = true;
            }
            // DEALLOCATE [PREPARE] ALL; a single DEALLOCATE names an SQL-level statement.
            Some(b'a') if is(b"all") && deallocate => effects.drops_statements = true,
            Some(b'a') if is(b"authorization") => effects.taints = true,
            // SET SESSION CHARACTERISTICS AS TRANSACTION …: a session default.
            Some(b'c') if is(b"characteristics") => effects.taints = true,
            Some(b'l') if is(b"load") => effects.taints = true,
            Some(b'l') if is(b"listen") => effects.taints = true,
            Some(b't') if is(b"temp") || is(b"temporary") => effects.taints = true,
            Some(b'p') if is(b"prepare") => effects.taints = true,
            Some(b'p') if is(b"pg_prepared_statements") => effects.reads_prepared_view = true,
            Some(b'p')
                if is(b"pg_advisory_lock")
                    || is(b"pg_advisory_lock_shared")
                    || is(b"pg_try_advisory_lock")
                    || is(b"pg_try_advisory_lock_shared") =>
            {
                effects.taints = true
            }
            Some(b'h') if is(b"hold") && previous.eq_ignore_ascii_case(b"with") => {
                effects.taints = true
            }
            _ => {}
        }
        previous = word;
    }
    effects
}

/// Whether the text after `set_config` starts with `('jit'`.
fn sets_jit(rest: &[u8]) -> bool {
    let mut words = rest
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
        .flat_map(|w| w.split_inclusive(|b| *b == b'('));
    matches!(words.next(), Some(b"(")) && words.next().is_some_and(|w| w.starts_with(b"'jit'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asyncpg_jit_switch_does_not_pin() {
        assert!(
            !scan_statement(
                "SELECT current_setting('jit') AS cur, set_config('jit', 'off', false) AS new"
            )
            .taints
        );
        assert!(!scan_statement("SELECT set_config( 'jit', $1, false)").taints);
        assert!(scan_statement("SELECT set_config('search_path', 'x', false)").taints);
        assert!(scan_statement("SELECT set_config('jitx', 'x', false)").taints);
    }

    #[test]
    fn statement_scan() {
        let scan = |sql| {
            let e = scan_statement(sql);
            (e.sets, e.taints)
        };
        assert_eq!(
            scan("SELECT abalance FROM pgbench_accounts WHERE aid = $1"),
            (false, false)
        );
        assert_eq!(scan("SET search_path = x"), (true, false));
        assert_eq!(scan("LISTEN chan"), (false, true));
        assert_eq!(scan("UNLISTEN *"), (false, false));
        assert_eq!(scan("CREATE TEMP TABLE t (v int)"), (false, true));
        assert_eq!(scan("create temporary table t (v int)"), (false, true));
        assert_eq!(scan("SELECT 1 AS attempts, 'contemporary'"), (false, false));
        assert_eq!(scan("select set_config('a', 'b', false)"), (false, true));
        assert_eq!(scan("SELECT pg_advisory_lock(1)"), (false, true));
        assert_eq!(scan("SELECT pg_advisory_xact_lock(1)"), (false, false));
        assert_eq!(
            scan("DECLARE c CURSOR WITH HOLD FOR SELECT 1"),
            (false, true)
        );
        assert_eq!(
            scan("SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;"),
            (true, false)
        );
        let discard = scan_statement("DISCARD ALL");
        assert!(discard.discards_all && discard.drops_statements && discard.sets);
        assert!(scan_statement("DEALLOCATE ALL").drops_statements);
        assert!(scan_statement("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY").taints);
        assert!(scan_statement("deallocate prepare all").drops_statements);
        assert!(!scan_statement("DEALLOCATE my_statement").drops_statements);
    }
}
