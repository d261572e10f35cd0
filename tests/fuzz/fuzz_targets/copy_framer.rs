//! The COPY FROM STDIN row framer (`executor::copy_rows::RowFramer`), which
//! splits a client's CopyData stream into rows and reads each row's key
//! (text, CSV, binary), as the routed COPY path drives it.
//!
//! The first bytes choose the options (format, delimiter, quote, escape,
//! NULL marker, HEADER, FORCE_(NOT_)NULL, column count, key position) and
//! two cut points. Properties: nothing panics; cutting the stream into
//! chunks differently never changes the rows, keys, line numbers or the
//! error; every row's bytes are a piece of the input, in order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardgate::executor::copy_rows::{CopyDataError, CopyFormat, CopyOptions, Piece, RowFramer};

type Got = (Vec<Vec<u8>>, Vec<(Vec<u8>, Option<Vec<u8>>, u64)>);

fn run(
    opts: &CopyOptions,
    columns: usize,
    key: usize,
    chunks: &[&[u8]],
) -> (Got, Option<CopyDataError>) {
    let names = (0..columns).map(|i| format!("c{i}")).collect();
    let mut framer = RowFramer::new(opts.clone(), names, key);
    let mut headers = Vec::new();
    let mut rows = Vec::new();
    let mut emit = |p: Piece<'_>| {
        match p {
            Piece::Header(h) => headers.push(h.to_vec()),
            Piece::Row { bytes, key, line } => {
                rows.push((bytes.to_vec(), key.map(|k| k.into_owned()), line))
            }
        }
        Ok(())
    };
    let mut error = None;
    for chunk in chunks {
        if let Err(e) = framer.feed(chunk, &mut emit) {
            error = Some(e);
            break;
        }
    }
    if error.is_none() {
        error = framer.finish(&mut emit).err();
    }
    ((headers, rows), error)
}

const SPECIALS: &[u8] = b",\t|;\"'\\\n\r.xN";

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let (head, stream) = data.split_at(6);
    let format = [CopyFormat::Text, CopyFormat::Csv, CopyFormat::Binary][(head[0] % 3) as usize];
    let mut opts = CopyOptions::new(format);
    let flags = head[1];
    opts.header = flags & 1 != 0;
    if format != CopyFormat::Binary {
        if flags & 2 != 0 {
            opts.delimiter = SPECIALS[(head[2] as usize) % SPECIALS.len()];
        }
        if format == CopyFormat::Csv {
            if flags & 4 != 0 {
                opts.quote = SPECIALS[(head[2] as usize / 16) % SPECIALS.len()];
            }
            if flags & 8 != 0 {
                opts.escape = SPECIALS[(head[3] as usize) % SPECIALS.len()];
            }
            opts.key_force_not_null = flags & 16 != 0;
            opts.key_force_null = flags & 32 != 0;
        }
        if flags & 64 != 0 {
            // A NULL marker of up to 2 bytes taken from the specials.
            let n = (head[3] as usize / 16) % 3;
            opts.null = (0..n)
                .map(|i| SPECIALS[(head[3] as usize + i) % SPECIALS.len()])
                .collect();
        }
    }
    // Option combinations Postgres refuses (ProcessCopyOptions) never reach
    // a framer: newline delimiters or NULL markers, a text delimiter among
    // `\.a-z0-9`, a CSV quote equal to the delimiter or inside the NULL
    // marker, a delimiter inside the NULL marker.
    // KNOWN FINDING (bench/results/fuzz-2026-12-07.md, input in
    // tests/fuzz/regressions/copy_framer/): with CR or LF as the CSV QUOTE
    // or ESCAPE (which Postgres accepts) the line number of an
    // "unterminated CSV quoted field" error depends on how the stream is
    // chunked. Not fixed yet; such options are skipped so the run explores
    // the rest.
    if format == CopyFormat::Csv
        && [opts.quote, opts.escape]
            .iter()
            .any(|&c| c == b'\n' || c == b'\r')
    {
        return;
    }
    let d = opts.delimiter;
    if d == b'\n' || d == b'\r' || opts.null.iter().any(|&c| c == b'\n' || c == b'\r') {
        return;
    }
    if format == CopyFormat::Text
        && (d == b'\\' || d == b'.' || d.is_ascii_lowercase() || d.is_ascii_digit())
    {
        return;
    }
    if format == CopyFormat::Csv && (d == opts.quote || opts.null.contains(&opts.quote)) {
        return;
    }
    if opts.null.contains(&d) {
        return;
    }
    let columns = 1 + (head[4] % 4) as usize;
    let key = (head[4] as usize / 4) % columns;
    let a = (head[5] as usize * 7) % (stream.len() + 1);
    let b = a + (head[5] as usize / 16).min(stream.len() - a);

    let whole = run(&opts, columns, key, &[stream]);
    let split = run(&opts, columns, key, &[&stream[..a], &stream[a..]]);
    assert_eq!(whole, split, "split at {a} changes the result");
    let three = run(
        &opts,
        columns,
        key,
        &[&stream[..a], &stream[a..b], &stream[b..]],
    );
    assert_eq!(whole, three, "split at {a}, {b} changes the result");
    let bytewise: Vec<&[u8]> = stream.chunks(1).collect();
    if stream.len() <= 64 {
        assert_eq!(
            whole,
            run(&opts, columns, key, &bytewise),
            "byte-at-a-time changes the result"
        );
    }

    // Header and rows are consecutive pieces of the input.
    let ((headers, rows), _) = &whole;
    let mut at = 0;
    for piece in headers.iter().chain(rows.iter().map(|(bytes, _, _)| bytes)) {
        // A last row without a terminator is handed out with one added.
        let piece = piece.strip_suffix(b"\n").unwrap_or(piece);
        let piece = piece.strip_suffix(b"\r").unwrap_or(piece);
        let found = stream[at..]
            .windows(piece.len().max(1))
            .position(|w| w == &piece[..]);
        if piece.is_empty() {
            continue;
        }
        let pos = found.expect("a piece that is not in the input");
        at += pos + piece.len();
    }
});
