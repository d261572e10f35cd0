//! Differential suite (issue #5 acceptance): the same rows in one unsharded
//! oracle database and split over 3 shards by the map's hash function; every
//! query runs through the fan-out executor and on the oracle, in the simple
//! protocol (text), the extended protocol with text results and with binary
//! results. Answers must be identical (column names and types, rows as a
//! multiset or in order where ORDER BY fixes it, command tag), or the query
//! must be one the suite expects to be refused with 0A000.

mod fanout_util;
mod support;

use fanout_util::{Answer, Fixture, Proto, PROTOS};

const MAP: &str = "functions:\n  by_id: { kind: hash }\ntables:\n  items: { key: id, function: by_id }\n  orders: { key: item_id, function: by_id }\n  countries: { replicated: true }\n";

const SCHEMA: &str = "
CREATE TABLE items (
  id int8 PRIMARY KEY, grp int4, cat text, price numeric(10,2), qty int4, score float8,
  flag bool, created date, ts timestamp, tstz timestamptz, uid uuid, note varchar(20),
  small int2, data bytea, big int8, code char(3));
CREATE TABLE orders (order_id int8, item_id int8, amount numeric(12,3), status text);
CREATE TABLE countries (code text PRIMARY KEY, name text);
INSERT INTO countries VALUES ('de','Germany'),('fr','France'),('jp','Japan');
";

/// How answers are compared.
#[derive(Clone, Copy)]
enum Order {
    /// Rows as a multiset.
    Any,
    /// Rows in exactly this order (ORDER BY is total).
    Exact,
    /// Multiset, and the listed output columns in this order (ties allowed).
    Keys(&'static [usize]),
}

struct Q {
    sql: &'static str,
    params: &'static [Option<&'static str>],
    order: Order,
    refused: bool,
}

const fn q(sql: &'static str, order: Order) -> Q {
    Q {
        sql,
        params: &[],
        order,
        refused: false,
    }
}

const fn qp(sql: &'static str, params: &'static [Option<&'static str>], order: Order) -> Q {
    Q {
        sql,
        params,
        order,
        refused: false,
    }
}

const fn refused(sql: &'static str) -> Q {
    Q {
        sql,
        params: &[],
        order: Order::Any,
        refused: true,
    }
}

use Order::*;

const QUERIES: &[Q] = &[
    // scatter / gather
    q("SELECT * FROM items", Any),
    q("SELECT id, cat, price FROM items WHERE qty > 50", Any),
    q("SELECT id, note FROM items WHERE note IS NULL", Any),
    qp("SELECT id, grp FROM items WHERE grp = $1", &[Some("2")], Any),
    qp("SELECT id FROM items WHERE id IN (1, 2, 3, 500, 1000)", &[], Any),
    q("SELECT i.id, o.order_id, o.amount FROM items i JOIN orders o ON o.item_id = i.id WHERE o.amount > 100", Any),
    q("SELECT i.id, c.name FROM items i JOIN countries c ON c.code = i.cat", Any),
    q("SELECT id, data, uid, tstz, ts, created FROM items WHERE id % 10 = 0", Any),
    // ORDER BY merge
    q("SELECT id, price FROM items ORDER BY id", Exact),
    q("SELECT id, price FROM items ORDER BY id DESC", Exact),
    q("SELECT id, price FROM items ORDER BY price, id", Exact),
    q("SELECT id, price FROM items ORDER BY price DESC, id", Exact),
    q("SELECT id, price FROM items ORDER BY price NULLS FIRST, id", Exact),
    q("SELECT id, price FROM items ORDER BY price DESC NULLS LAST, id DESC", Exact),
    q("SELECT id, score FROM items ORDER BY score, id", Exact),
    q("SELECT id, score FROM items ORDER BY score DESC, id", Exact),
    q("SELECT id, grp, qty FROM items ORDER BY grp, qty DESC, id", Exact),
    q("SELECT id, cat FROM items ORDER BY cat, id", Exact),
    q("SELECT id, cat FROM items ORDER BY cat DESC NULLS LAST, id", Exact),
    q("SELECT id, note FROM items ORDER BY note COLLATE \"C\", id", Exact),
    q("SELECT id, code FROM items ORDER BY code, id", Exact),
    q("SELECT id, flag FROM items ORDER BY flag, id", Exact),
    q("SELECT id, created FROM items ORDER BY created, id", Exact),
    q("SELECT id, ts FROM items ORDER BY ts DESC, id", Exact),
    q("SELECT id, tstz FROM items ORDER BY tstz, id", Exact),
    q("SELECT id, uid FROM items ORDER BY uid", Exact),
    q("SELECT id, data FROM items ORDER BY data, id", Exact),
    q("SELECT id, small, big FROM items ORDER BY small, big DESC, id", Exact),
    q("SELECT cat, grp FROM items ORDER BY grp", Keys(&[1])),
    // hidden sort columns, positions, aliases
    q("SELECT id FROM items ORDER BY price, id", Exact),
    q("SELECT cat FROM items ORDER BY qty DESC, id", Exact),
    q("SELECT id, price AS p FROM items ORDER BY p DESC, 1", Exact),
    q("SELECT id, qty * 2 AS dbl FROM items ORDER BY 2, 1", Exact),
    q("SELECT * FROM items ORDER BY created DESC, id", Exact),
    q("SELECT id FROM items ORDER BY qty * -1, id", Exact),
    q("SELECT id, lower(cat) FROM items ORDER BY lower(cat), id", Exact),
    // LIMIT / OFFSET
    q("SELECT id, price FROM items ORDER BY id LIMIT 10", Exact),
    q("SELECT id, price FROM items ORDER BY price DESC, id LIMIT 25 OFFSET 10", Exact),
    q("SELECT id FROM items ORDER BY score, id OFFSET 2990", Exact),
    q("SELECT id FROM items ORDER BY id LIMIT 0", Exact),
    q("SELECT id FROM items ORDER BY id LIMIT ALL", Exact),
    qp("SELECT id, qty FROM items ORDER BY qty, id LIMIT $1 OFFSET $2", &[Some("7"), Some("3")], Exact),
    qp("SELECT id FROM items WHERE grp = $1 ORDER BY id DESC LIMIT $2", &[Some("1"), Some("5")], Exact),
    q("SELECT count(*) FROM (SELECT id FROM items WHERE qty > 10) s", Any),
    // aggregates
    q("SELECT count(*) FROM items", Any),
    q("SELECT count(*), count(note), count(grp) FROM items", Any),
    q("SELECT sum(qty), sum(big), sum(price), sum(small) FROM items", Any),
    q("SELECT min(price), max(price), min(cat), max(created), min(ts), max(tstz) FROM items", Any),
    q("SELECT avg(qty), avg(price), avg(big), avg(small) FROM items", Any),
    q("SELECT avg(score), sum(score) FROM items WHERE score <> 'NaN' AND score NOT IN ('Infinity', '-Infinity')", Any),
    // (sum over both infinities is NaN, whose bit pattern in binary format
    // depends on the order of additions, in Postgres too)
    q("SELECT sum(score) FILTER (WHERE score <> '-Infinity'), min(score), max(score) FROM items", Any),
    q("SELECT bool_and(flag), bool_or(flag), every(qty > -100) FROM items", Any),
    q("SELECT bit_and(qty), bit_or(qty), bit_xor(small) FROM items", Any),
    q("SELECT max(qty) - min(qty), round(avg(price), 2), sum(qty) / count(*) FROM items", Any),
    q("SELECT count(*) FILTER (WHERE flag), sum(qty) FILTER (WHERE grp > 0) FROM items", Any),
    q("SELECT count(DISTINCT grp) FROM items", Any),
    q("SELECT count(DISTINCT cat), sum(qty) FROM items", Any),
    q("SELECT sum(DISTINCT qty), avg(DISTINCT qty) FROM items", Any),
    q("SELECT count(*) FROM items WHERE id < 0", Any),
    q("SELECT sum(qty), avg(price), max(cat) FROM items WHERE id < 0", Any),
    q("SELECT min(id) FROM items WHERE qty > 1000", Any),
    // GROUP BY
    q("SELECT grp, count(*) FROM items GROUP BY grp", Any),
    q("SELECT grp, count(*), sum(price), avg(qty) FROM items GROUP BY grp ORDER BY grp", Exact),
    q("SELECT cat, grp, count(*) FROM items GROUP BY cat, grp ORDER BY cat, grp", Exact),
    q("SELECT grp AS g, max(qty) FROM items GROUP BY g ORDER BY g DESC NULLS LAST", Exact),
    q("SELECT grp, count(*) FROM items GROUP BY 1 ORDER BY 2 DESC, 1", Exact),
    q("SELECT grp, count(*) AS n FROM items GROUP BY grp HAVING count(*) > 400 ORDER BY n", Keys(&[1])),
    q("SELECT grp, sum(qty) FROM items GROUP BY grp HAVING avg(price) > 0", Any),
    q("SELECT grp FROM items GROUP BY grp HAVING max(qty) > 70 ORDER BY grp", Exact),
    q("SELECT created, count(*) FROM items GROUP BY created ORDER BY count(*) DESC, created LIMIT 5", Exact),
    q("SELECT flag, count(DISTINCT grp), count(*) FROM items GROUP BY flag ORDER BY flag", Exact),
    q("SELECT grp + 1, count(*) * 2 FROM items GROUP BY grp + 1 ORDER BY 1", Exact),
    q("SELECT grp, round(avg(score)::numeric, 3) FROM items WHERE score BETWEEN -1000 AND 1000 GROUP BY grp ORDER BY grp", Exact),
    q("SELECT date_trunc('month', ts) AS m, sum(qty) FROM items GROUP BY 1 ORDER BY 1", Exact),
    q("SELECT cat, string_agg(DISTINCT code, ',') IS NOT NULL FROM items GROUP BY cat ORDER BY cat", Exact),
    q("SELECT id, count(*) FROM items GROUP BY id ORDER BY id LIMIT 20", Exact),
    q("SELECT i.id, count(o.order_id), sum(o.amount) FROM items i JOIN orders o ON o.item_id = i.id GROUP BY i.id ORDER BY sum(o.amount) DESC, i.id LIMIT 10", Exact),
    q("SELECT o.status, count(*), sum(o.amount), avg(o.amount) FROM items i JOIN orders o ON o.item_id = i.id GROUP BY o.status ORDER BY o.status", Exact),
    q("SELECT grp, count(*) FROM items GROUP BY grp ORDER BY count(*) DESC, grp LIMIT 3 OFFSET 1", Exact),
    qp("SELECT grp, count(*) FROM items GROUP BY grp HAVING count(*) > $1 ORDER BY grp", &[Some("300")], Exact),
    qp("SELECT grp, count(*) FROM items WHERE qty > $1 GROUP BY grp ORDER BY grp", &[Some("10")], Exact),
    // DISTINCT
    q("SELECT DISTINCT grp FROM items", Any),
    q("SELECT DISTINCT cat, flag FROM items", Any),
    q("SELECT DISTINCT grp FROM items ORDER BY grp", Exact),
    q("SELECT DISTINCT price FROM items ORDER BY price DESC NULLS LAST LIMIT 15", Exact),
    q("SELECT DISTINCT ON (grp) grp, id, qty FROM items ORDER BY grp, qty DESC, id", Exact),
    q("SELECT DISTINCT ON (cat) cat, id FROM items ORDER BY cat, id DESC", Exact),
    q("SELECT DISTINCT ON (grp) id FROM items ORDER BY grp, id", Exact),
    q("SELECT DISTINCT grp, count(*) FROM items GROUP BY grp, cat ORDER BY 1, 2", Exact),
    refused("SELECT count(*) FROM (SELECT DISTINCT grp FROM items) s"),
    // more shapes
    q("SELECT id, ts::time AS t FROM items ORDER BY t, id", Exact),
    q("SELECT id, price FROM items WHERE id IN (1, 2, 3, 4, 5, 6) ORDER BY id", Exact),
    q("SELECT count(*), sum(qty) FROM items WHERE id IN (10, 20, 30)", Any),
    q("WITH x AS (SELECT id, qty FROM items WHERE qty > 50) SELECT count(*), max(qty) FROM x", Any),
    q("SELECT c.name, count(*) FROM items i JOIN countries c ON c.code = i.cat GROUP BY c.name ORDER BY c.name", Exact),
    q("SELECT grp FROM items GROUP BY grp ORDER BY sum(qty) DESC, grp", Exact),
    q("SELECT cat, count(*) FROM items GROUP BY cat ORDER BY cat NULLS FIRST", Exact),
    q("SELECT count(*) FROM items HAVING count(*) > 5", Any),
    q("SELECT 1 AS one FROM items HAVING true", Any),
    q("SELECT 'x' AS k FROM items WHERE id < 0 HAVING 1 = 1", Any),
    q("SELECT max(qty) FROM items GROUP BY grp", Any),
    q("SELECT grp, length(string_agg(cat, ',')) FROM items GROUP BY grp ORDER BY grp", Exact),
    q("SELECT count(*) FROM items LIMIT 1", Any),
    q("SELECT id FROM items ORDER BY id LIMIT 5 OFFSET 2995", Exact),
    q("SELECT avg(ts - timestamp '2023-01-01'), sum(ts - timestamp '2023-01-01') FROM items", Any),
    q("SELECT sum(price) / count(*), sum(qty)::float8 / count(*) FROM items", Any),
    q("SELECT grp, min(code), max(note) FROM items GROUP BY grp ORDER BY grp", Exact),
    q("SELECT grp, bool_or(flag) FILTER (WHERE qty > 0) FROM items GROUP BY grp ORDER BY 1", Exact),
    q("SELECT upper(cat) AS u, count(*) FROM items GROUP BY upper(cat) ORDER BY u", Exact),
    // subqueries co-located on the sharding key
    q("SELECT id FROM items WHERE id IN (SELECT item_id FROM orders WHERE amount > 400)", Any),
    q("SELECT count(*) FROM items i WHERE EXISTS (SELECT 1 FROM orders o WHERE o.item_id = i.id AND o.status = 'paid')", Any),
    q("SELECT count(*), sum(qty) FROM items i WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.item_id = i.id)", Any),
    q("SELECT i.id, (SELECT count(*) FROM orders o WHERE o.item_id = i.id) AS n FROM items i ORDER BY n DESC, i.id LIMIT 10", Exact),
    // more filters, orders, groups (session 2)
    q("SELECT id, qty FROM items WHERE qty BETWEEN 10 AND 20 ORDER BY qty, id", Exact),
    q("SELECT id FROM items WHERE cat = 'de' OR cat = 'fr' ORDER BY id LIMIT 50", Exact),
    qp("SELECT id, price FROM items WHERE price > $1 ORDER BY price DESC, id LIMIT 20", &[Some("50")], Exact),
    q("SELECT count(*), min(id), max(id) FROM items WHERE flag", Any),
    q("SELECT grp, min(price), max(price) FROM items GROUP BY grp ORDER BY grp", Exact),
    q("SELECT cat, avg(qty) FROM items GROUP BY cat ORDER BY cat NULLS LAST", Exact),
    q("SELECT flag, sum(price) FROM items GROUP BY flag ORDER BY flag NULLS FIRST", Exact),
    q("SELECT DISTINCT created FROM items ORDER BY created LIMIT 10", Exact),
    q("SELECT DISTINCT ON (flag) flag, id FROM items ORDER BY flag, id", Exact),
    q("SELECT id, small FROM items ORDER BY small DESC NULLS LAST, id LIMIT 30", Exact),
    q("SELECT id, big FROM items ORDER BY big, id LIMIT 30 OFFSET 30", Exact),
    q("SELECT count(*) FROM items WHERE note LIKE 'n%'", Any),
    q("SELECT grp, count(*) FILTER (WHERE flag), count(*) FILTER (WHERE NOT flag) FROM items GROUP BY grp ORDER BY grp", Exact),
    q("SELECT sum(qty * price) FROM items", Any),
    q("SELECT grp, sum(qty) - min(qty) AS d FROM items GROUP BY grp ORDER BY d DESC, grp", Exact),
    q("SELECT o.status, count(*) FROM orders o GROUP BY o.status ORDER BY o.status", Exact),
    q("SELECT item_id, sum(amount) FROM orders GROUP BY item_id ORDER BY item_id LIMIT 15", Exact),
    q("SELECT count(*) FROM orders WHERE amount IS NULL", Any),
    q("SELECT max(amount), min(amount), avg(amount) FROM orders", Any),
    q("SELECT id, uid FROM items ORDER BY uid DESC LIMIT 10", Exact),
    q("SELECT id, data FROM items ORDER BY data DESC NULLS LAST, id LIMIT 10", Exact),
    q("SELECT code, count(*) FROM items GROUP BY code ORDER BY code", Exact),
    q("SELECT id FROM items WHERE id IN (SELECT item_id FROM orders WHERE status = 'paid') ORDER BY id LIMIT 25", Exact),
    q("SELECT count(*) FROM items i JOIN countries c ON c.code = i.cat WHERE c.name = 'Japan'", Any),
    q("SELECT id, price FROM items ORDER BY price NULLS FIRST, id DESC LIMIT 40", Exact),
    refused("SELECT id, row_number() OVER () FROM items"),
    refused("SELECT mode() WITHIN GROUP (ORDER BY grp) FROM items"),
    refused("SELECT json_agg(id) FROM items"),
    refused("SELECT id FROM items INTERSECT SELECT item_id FROM orders"),
    // refusals
    refused("SELECT id, ts - timestamp '2023-01-01' AS iv FROM items ORDER BY iv"),
    refused("SELECT id, rank() OVER (ORDER BY qty) FROM items"),
    refused("SELECT stddev(qty) FROM items"),
    refused("SELECT variance(price) FROM items"),
    refused("SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY qty) FROM items"),
    refused("SELECT string_agg(cat, ',' ORDER BY id) FROM items"),
    refused("SELECT array_agg(id) FROM items"),
    refused("SELECT id FROM items UNION SELECT item_id FROM orders"),
    refused("SELECT id FROM items WHERE id NOT IN (SELECT item_id FROM orders)"),
    refused("SELECT id FROM items i WHERE EXISTS (SELECT 1 FROM orders o WHERE o.order_id = i.id)"),
    refused("SELECT id FROM items WHERE id IN (SELECT item_id FROM orders ORDER BY amount LIMIT 5)"),
    refused("SELECT count(*) FROM (SELECT grp FROM items GROUP BY grp) s"),
    refused("SELECT id FROM items ORDER BY id FETCH FIRST 5 ROWS ONLY"),
    refused("SELECT count(DISTINCT grp), count(DISTINCT cat) FROM items"),
    refused("SELECT avg(score::real) FROM items"),
    refused("SELECT grp, cat, count(*) FROM items GROUP BY grp"),
    refused("SELECT grp, count(*) FROM items GROUP BY ROLLUP (grp)"),
    refused("WITH RECURSIVE r AS (SELECT 1 AS n UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * FROM r, items"),
];

fn rng(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *seed >> 33
}

fn item_rows(n: u64) -> Vec<(String, String)> {
    let cats = [
        "'alpha'",
        "'beta'",
        "'Gamma'",
        "'delta'",
        "'épsilon'",
        "''",
        "'de'",
        "'fr'",
    ];
    let mut s = 42u64;
    (1..=n)
        .map(|id| {
            let r = rng(&mut s);
            let grp = if id % 53 == 0 { "NULL".into() } else { format!("{}", (r % 7) as i64 - 3) };
            let cat = if id % 41 == 0 { "NULL" } else { cats[(rng(&mut s) % cats.len() as u64) as usize] };
            let cents = (rng(&mut s) % 200_000) as i64 - 50_000;
            let price = if id % 37 == 0 { "NULL".into() } else { format!("{}.{:02}", if cents < 0 { "-" } else { "" }.to_string() + &(cents.abs() / 100).to_string(), cents.abs() % 100) };
            let qty = (rng(&mut s) % 100) as i64 - 20;
            let score = match id {
                _ if id % 97 == 0 => "'NaN'".into(),
                _ if id % 89 == 0 => "'Infinity'".into(),
                _ if id % 83 == 0 => "'-Infinity'".into(),
                _ if id % 31 == 0 => "NULL".into(),
                _ => format!("{}", ((rng(&mut s) % 4000) as f64 - 1000.0) / 4.0),
            };
            let flag = match rng(&mut s) % 3 { 0 => "true", 1 => "false", _ => if id % 5 == 0 { "NULL" } else { "true" } };
            let day = rng(&mut s) % 400;
            let secs = rng(&mut s) % 86400;
            let micros = rng(&mut s) % 1000;
            let uid = format!("{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}", rng(&mut s), rng(&mut s) % 0xffff, rng(&mut s) % 0xfff, rng(&mut s) % 0xfff, rng(&mut s) * 7919 % 0xffff_ffff_ffff);
            let note = if id % 3 == 0 { "NULL".into() } else { format!("'n{}'", rng(&mut s) % 50) };
            let small = (rng(&mut s) % 2000) as i64 - 1000;
            let data = format!("'\\x{:02x}{:02x}'", rng(&mut s) % 256, rng(&mut s) % 4);
            let big = (rng(&mut s) as i64 % 1000) * 9_000_000_000_000_000 / 1000 + id as i64;
            let code = ["'ab'", "'ab '", "'abc'", "'b'", "NULL"][(rng(&mut s) % 5) as usize];
            (
                id.to_string(),
                format!(
                    "({id}, {grp}, {cat}, {price}, {qty}, {score}, {flag}, date '2023-01-01' + {day}, timestamp '2023-01-01' + interval '{day} days {secs} seconds {micros} microseconds', timestamptz '2023-01-01 00:00:00+00' + interval '{secs} minutes', '{uid}', {note}, {small}, {data}, {big}, {code})"
                ),
            )
        })
        .collect()
}

fn order_rows(n: u64, items: u64) -> Vec<(String, String)> {
    let statuses = ["'new'", "'paid'", "'shipped'", "NULL"];
    let mut s = 7u64;
    (1..=n)
        .map(|oid| {
            let item = rng(&mut s) % items + 1;
            let amount = format!("{}.{:03}", rng(&mut s) % 500, rng(&mut s) % 1000);
            let st = statuses[(rng(&mut s) % 4) as usize];
            (item.to_string(), format!("({oid}, {item}, {amount}, {st})"))
        })
        .collect()
}

fn compare(q: &Q, proto: Proto, got: &Answer, want: &Answer) -> Result<(), String> {
    if got.fields != want.fields {
        return Err(format!(
            "columns differ: {:?} vs oracle {:?}",
            got.fields, want.fields
        ));
    }
    if got.tag != want.tag {
        return Err(format!("tag {:?} vs oracle {:?}", got.tag, want.tag));
    }
    match q.order {
        Exact => {
            if got.rows != want.rows {
                let first = got
                    .rows
                    .iter()
                    .zip(want.rows.iter())
                    .position(|(a, b)| a != b);
                return Err(format!(
                    "{proto:?}: rows differ ({} vs {}), first difference at {first:?}: {:?} vs {:?}",
                    got.rows.len(),
                    want.rows.len(),
                    first.map(|i| fanout_util::cells(&got.rows[i])),
                    first.map(|i| fanout_util::cells(&want.rows[i]))
                ));
            }
        }
        Any | Keys(_) => {
            let mut a = got.rows.clone();
            let mut b = want.rows.clone();
            a.sort();
            b.sort();
            if a != b {
                return Err(format!(
                    "{proto:?}: row multisets differ ({} vs {} rows)",
                    a.len(),
                    b.len()
                ));
            }
            if let Keys(cols) = q.order {
                for c in cols {
                    if got.column(*c) != want.column(*c) {
                        return Err(format!("{proto:?}: order of column {c} differs"));
                    }
                }
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_matches_the_oracle() {
    let mut fx = Fixture::new("fanout_diff", MAP).await;
    fx.everywhere(SCHEMA).await;
    const ITEMS: u64 = 3000;
    fx.load("items", "id", &item_rows(ITEMS)).await;
    fx.load("orders", "item_id", &order_rows(6000, ITEMS)).await;
    // The fleet's clusters are initialised with the C.UTF-8 locale.
    fx.executor.set_text_collation_bytewise(true);

    fx.start_proxy().await;

    let (mut identical, mut refusals, mut failures) = (0, 0, Vec::new());
    for q in QUERIES {
        for proto in PROTOS {
            if proto == Proto::Simple && !q.params.is_empty() {
                continue; // the simple protocol has no parameters
            }
            // The executor called directly, and shardgate end to end.
            let direct = fx.via_executor(q.sql, q.params, proto).await;
            let proxied = fx.via_proxy(q.sql, q.params, proto).await;
            // Extended protocol also fetched in parts of 7 rows (JDBC's
            // fetch size), which must add up to the same answer.
            let in_parts = match proto {
                Proto::Simple => None,
                _ => match fx.via_proxy_in_parts(q.sql, q.params, proto, 7).await {
                    Ok(answer) => Some(answer),
                    Err(e) => {
                        failures.push(format!("{} [{proto:?} in parts]: {e}", q.sql));
                        None
                    }
                },
            };
            let want = if q.refused {
                None
            } else {
                let want = fx.via_oracle(q.sql, q.params, proto).await;
                assert!(
                    want.error.is_none(),
                    "oracle failed on {}: {:?}",
                    q.sql,
                    want.error
                );
                Some(want)
            };
            let paths = [
                Some(("executor", &direct)),
                Some(("shardgate", &proxied)),
                in_parts.as_ref().map(|a| ("shardgate in parts", a)),
            ];
            for (path, got) in paths.into_iter().flatten() {
                let Some(want) = &want else {
                    match &got.error {
                        Some((code, msg, _)) if code == "0A000" => {
                            refusals += 1;
                            if proto == Proto::Simple && path == "executor" {
                                println!("refused: {} -- {msg}", q.sql);
                            }
                        }
                        other => failures.push(format!(
                            "{} [{proto:?} via {path}]: expected 0A000, got {other:?} / {} rows",
                            q.sql,
                            got.rows.len()
                        )),
                    }
                    continue;
                };
                if let Some(e) = &got.error {
                    failures.push(format!("{} [{proto:?} via {path}]: error {e:?}", q.sql));
                    continue;
                }
                match compare(q, proto, got, want) {
                    Ok(()) => identical += 1,
                    Err(e) => failures.push(format!("{} [{proto:?} via {path}]: {e}", q.sql)),
                }
            }
        }
    }
    println!(
        "fan-out differential: {} queries x {} protocols x (executor, shardgate, shardgate in parts of 7 rows for the extended protocol): {identical} identical, {refusals} refused (0A000), {} different",
        QUERIES.len(),
        PROTOS.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} differences:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(identical + refusals >= 150);
}
