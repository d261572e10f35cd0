//! Query text in a client encoding other than UTF-8.
//!
//! The client's bytes are what the shards receive (their sessions have the
//! client's `client_encoding`); shardgate only needs the text to route it.
//! The single-byte encodings Western applications use (LATIN1, LATIN9,
//! WIN1252) are converted exactly, as the server converts them, so a text
//! sharding key hashes as it will be stored. Anything else is read with
//! replacement characters: good enough to classify a statement, never to
//! place a key (the session refuses what would need it).

/// Text decoded from the client's encoding.
pub struct Decoded {
    pub text: String,
    /// Converted as the server would: keys in it route correctly.
    pub exact: bool,
}

/// Decodes `bytes` (not valid UTF-8) from `client_encoding` (a setting's
/// value, quoted or not; `None`: unknown).
pub fn decode(bytes: &[u8], client_encoding: Option<&str>) -> Decoded {
    let table = client_encoding.and_then(|name| match canonical(name).as_str() {
        "latin1" | "iso88591" => Some(Table::Latin1),
        "latin9" | "iso885915" => Some(Table::Latin9),
        "win1252" | "windows1252" | "cp1252" => Some(Table::Win1252),
        _ => None,
    });
    let Some(table) = table else {
        return Decoded {
            text: String::from_utf8_lossy(bytes).into_owned(),
            exact: false,
        };
    };
    let mut text = String::with_capacity(bytes.len() + bytes.len() / 8);
    let mut exact = true;
    for &b in bytes {
        match table.char_of(b) {
            Some(c) => text.push(c),
            None => {
                text.push(char::REPLACEMENT_CHARACTER);
                exact = false;
            }
        }
    }
    Decoded { text, exact }
}

/// Postgres compares encoding names ignoring case and everything but
/// letters and digits; a setting's value may be quoted.
fn canonical(name: &str) -> String {
    name.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

#[derive(Clone, Copy)]
enum Table {
    Latin1,
    Latin9,
    Win1252,
}

/// WIN1252's 0x80–0x9F (0: undefined, as in Postgres' conversion).
const WIN1252_HIGH: [u16; 32] = [
    0x20AC, 0, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160, 0x2039,
    0x0152, 0, 0x017D, 0, 0, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022, 0x2013, 0x2014, 0x02DC,
    0x2122, 0x0161, 0x203A, 0x0153, 0, 0x017E, 0x0178,
];

impl Table {
    fn char_of(self, b: u8) -> Option<char> {
        let code = match (self, b) {
            (_, 0..=0x7F) => u32::from(b),
            (Table::Win1252, 0x80..=0x9F) => match WIN1252_HIGH[usize::from(b - 0x80)] {
                0 => return None,
                c => u32::from(c),
            },
            (Table::Latin9, 0xA4) => 0x20AC,
            (Table::Latin9, 0xA6) => 0x0160,
            (Table::Latin9, 0xA8) => 0x0161,
            (Table::Latin9, 0xB4) => 0x017D,
            (Table::Latin9, 0xB8) => 0x017E,
            (Table::Latin9, 0xBC) => 0x0152,
            (Table::Latin9, 0xBD) => 0x0153,
            (Table::Latin9, 0xBE) => 0x0178,
            _ => u32::from(b),
        };
        char::from_u32(code)
    }
}

#[cfg(test)]
mod tests {
    use super::decode;

    #[test]
    fn single_byte_encodings_convert_as_postgres_does() {
        let latin9 = decode(b"M\xfcller \xa4", Some("'LATIN9'"));
        assert_eq!((latin9.text.as_str(), latin9.exact), ("Müller €", true));
        let latin1 = decode(b"M\xfcller \xa4", Some("latin1"));
        assert_eq!(latin1.text, "Müller ¤");
        let win = decode(b"\x80 \x93q\x94", Some("WIN1252"));
        assert_eq!((win.text.as_str(), win.exact), ("€ “q”", true));
        assert!(!decode(b"\x81", Some("win1252")).exact);
        let unknown = decode(b"\xa4\xa2", Some("EUC_JP"));
        assert!(!unknown.exact);
        assert!(!decode(b"\xfc", None).exact);
    }
}
