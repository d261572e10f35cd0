//! One set of type OIDs for clients, whichever shard answers.
//!
//! A type created on every shard (`CREATE TYPE mood AS ENUM …`, a domain, a
//! table's row type) gets whatever OID each shard's counter is at, so the
//! same type has a different OID on each shard. Drivers cache types by OID
//! (asyncpg introspects every OID a RowDescription names; psycopg keys its
//! adapters by OID): answers from different shards then disagree, and a
//! Parse declaring one shard's OID means nothing, or another type, on the
//! next (`cache lookup failed for type N`). The first shard's OIDs are the
//! ones clients see: RowDescription and ParameterDescription from another
//! shard are rewritten to them (in place: an OID is four bytes either way),
//! and a Parse's declared parameter types are rewritten to the target
//! shard's. Built-in types (OIDs below 16384) are the same everywhere and
//! never touched. Not rewritten: OIDs inside binary-format values (array
//! element types, composite fields) and in rows of catalog queries, which
//! shardgate sends to the first shard when the OIDs differ.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

/// `FirstNormalObjectId`: OIDs below it are built in and equal on every shard.
pub const FIRST_USER_OID: u32 = 16384;

/// The translation between each shard's type OIDs and the first shard's.
#[derive(Debug, Default)]
pub struct TypeOids {
    /// Per shard: its OID → the first shard's, where they differ.
    to_client: Vec<HashMap<u32, u32>>,
    /// Per shard: the first shard's OID → its own, where they differ.
    to_shard: Vec<HashMap<u32, u32>>,
}

impl TypeOids {
    /// `types[i]`: shard i's user-defined types as (OID, schema-qualified
    /// name). A type the first shard lacks keeps its OID.
    pub fn build(types: &[Vec<(u32, String)>]) -> TypeOids {
        let Some(first) = types.first() else {
            return TypeOids::default();
        };
        let canonical: HashMap<&str, u32> = first
            .iter()
            .map(|(oid, name)| (name.as_str(), *oid))
            .collect();
        let mut map = TypeOids::default();
        for shard_types in types {
            let mut to_client = HashMap::new();
            let mut to_shard = HashMap::new();
            for (oid, name) in shard_types {
                if let Some(&client) = canonical.get(name.as_str()) {
                    if client != *oid {
                        to_client.insert(*oid, client);
                        to_shard.insert(client, *oid);
                    }
                }
            }
            map.to_client.push(to_client);
            map.to_shard.push(to_shard);
        }
        map
    }

    /// True when every shard agrees: nothing to rewrite.
    pub fn is_empty(&self) -> bool {
        self.to_client.iter().all(HashMap::is_empty)
    }

    /// The OID a client knows for `shard`'s `oid`.
    pub fn client_oid(&self, shard: usize, oid: u32) -> u32 {
        translate(self.to_client.get(shard), oid)
    }

    /// `shard`'s OID for the client's `oid`.
    pub fn shard_oid(&self, shard: usize, oid: u32) -> u32 {
        translate(self.to_shard.get(shard), oid)
    }

    /// Rewrites the type OIDs of a RowDescription body from `shard`.
    pub fn rewrite_row_description(&self, shard: usize, body: &mut [u8]) {
        let Some(map) = self.to_client.get(shard).filter(|m| !m.is_empty()) else {
            return;
        };
        let Some(count) = read_i16(body, 0) else {
            return;
        };
        let mut at = 2;
        for _ in 0..count.max(0) {
            // name\0 | table oid (4) | column (2) | type oid (4) | len (2) | typmod (4) | format (2)
            let Some(end) = body.get(at..).and_then(|b| b.iter().position(|c| *c == 0)) else {
                return;
            };
            let type_at = at + end + 1 + 4 + 2;
            rewrite_at(map, body, type_at);
            at = at + end + 1 + 18;
        }
    }

    /// Rewrites a ParameterDescription body from `shard`.
    pub fn rewrite_parameter_description(&self, shard: usize, body: &mut [u8]) {
        if let Some(map) = self.to_client.get(shard).filter(|m| !m.is_empty()) {
            rewrite_list(map, body, 0);
        }
    }

    /// Rewrites the declared parameter types of a Parse body for `shard`.
    pub fn rewrite_parse(&self, shard: usize, body: &mut [u8]) {
        let Some(map) = self.to_shard.get(shard).filter(|m| !m.is_empty()) else {
            return;
        };
        // name\0 query\0 count (2) oids (4 each)
        let Some(name_end) = body.iter().position(|c| *c == 0) else {
            return;
        };
        let Some(query_end) = body
            .get(name_end + 1..)
            .and_then(|b| b.iter().position(|c| *c == 0))
        else {
            return;
        };
        rewrite_list(map, body, name_end + 1 + query_end + 1);
    }

    /// Rewrites every Parse message among the complete frames of `frames`.
    pub fn rewrite_parse_frames(&self, shard: usize, frames: &mut [u8]) {
        let mut at = 0;
        while let Some(len) = read_i32(frames, at + 1) {
            let end = at + 1 + len.max(4) as usize;
            if end > frames.len() {
                return;
            }
            if frames[at] == b'P' {
                self.rewrite_parse(shard, &mut frames[at + 5..end]);
            }
            at = end;
        }
    }
}

fn translate(map: Option<&HashMap<u32, u32>>, oid: u32) -> u32 {
    if oid < FIRST_USER_OID {
        return oid;
    }
    map.and_then(|m| m.get(&oid)).copied().unwrap_or(oid)
}

fn read_i16(body: &[u8], at: usize) -> Option<i16> {
    let b = body.get(at..at + 2)?;
    Some(i16::from_be_bytes([b[0], b[1]]))
}

fn read_i32(body: &[u8], at: usize) -> Option<i32> {
    let b = body.get(at..at + 4)?;
    Some(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// `count (2) | oid (4) …` starting at `at`.
fn rewrite_list(map: &HashMap<u32, u32>, body: &mut [u8], at: usize) {
    let Some(count) = read_i16(body, at) else {
        return;
    };
    for i in 0..count.max(0) as usize {
        rewrite_at(map, body, at + 2 + 4 * i);
    }
}

fn rewrite_at(map: &HashMap<u32, u32>, body: &mut [u8], at: usize) {
    let Some(slot) = body.get_mut(at..at + 4) else {
        return;
    };
    let oid = u32::from_be_bytes([slot[0], slot[1], slot[2], slot[3]]);
    if oid < FIRST_USER_OID {
        return;
    }
    if let Some(&to) = map.get(&oid) {
        slot.copy_from_slice(&to.to_be_bytes());
    }
}

/// The current translation, replaced when the catalog is read again; a
/// flag keeps the common case (every shard agrees) to one atomic load.
#[derive(Debug, Default)]
pub struct TypeOidsCell {
    active: AtomicBool,
    map: RwLock<Arc<TypeOids>>,
}

impl TypeOidsCell {
    /// Whether the shards' OIDs differ (a translation is in force).
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// The translation, or `None` when the shards agree.
    pub fn get(&self) -> Option<Arc<TypeOids>> {
        if !self.is_active() {
            return None;
        }
        let map = match self.map.read() {
            Ok(map) => map.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        Some(map)
    }

    pub fn set(&self, oids: TypeOids) {
        let active = !oids.is_empty();
        match self.map.write() {
            Ok(mut map) => *map = Arc::new(oids),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(oids),
        }
        self.active.store(active, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oids() -> TypeOids {
        TypeOids::build(&[
            vec![
                (16500, "public.mood".into()),
                (16499, "public._mood".into()),
            ],
            vec![
                (16600, "public.mood".into()),
                (16599, "public._mood".into()),
            ],
            vec![
                (16500, "public.mood".into()),
                (16700, "public.only_here".into()),
            ],
        ])
    }

    #[test]
    fn maps_each_shard_to_the_first() {
        let map = oids();
        assert!(!map.is_empty());
        assert_eq!(map.client_oid(1, 16600), 16500);
        assert_eq!(map.client_oid(1, 16599), 16499);
        assert_eq!(map.shard_oid(1, 16500), 16600);
        assert_eq!(map.client_oid(2, 16500), 16500);
        assert_eq!(map.client_oid(2, 16700), 16700);
        assert_eq!(map.client_oid(0, 23), 23);
        assert_eq!(map.client_oid(9, 16600), 16600);
        assert!(TypeOids::build(&[vec![(1, "a".into())], vec![(1, "a".into())]]).is_empty());
    }

    #[test]
    fn rewrites_messages_in_place() {
        let map = oids();
        // RowDescription: two columns, `m` of 16600 and `n` of int4.
        let mut body = vec![0, 2];
        for (name, oid) in [("m", 16600u32), ("n", 23)] {
            body.extend_from_slice(name.as_bytes());
            body.push(0);
            body.extend_from_slice(&1234u32.to_be_bytes());
            body.extend_from_slice(&1i16.to_be_bytes());
            body.extend_from_slice(&oid.to_be_bytes());
            body.extend_from_slice(&[0, 4, 255, 255, 255, 255, 0, 0]);
        }
        map.rewrite_row_description(1, &mut body);
        // count (2) | "m\0" | table oid (4) | column (2) | type oid at 10.
        assert_eq!(&body[10..14], &16500u32.to_be_bytes());
        assert_eq!(&body[4..8], &1234u32.to_be_bytes(), "table OID untouched");
        // The second field starts at 4 + 18: "n\0", then its type at 30.
        assert_eq!(&body[30..34], &23u32.to_be_bytes());
        // ParameterDescription.
        let mut params = vec![0, 2];
        params.extend_from_slice(&16599u32.to_be_bytes());
        params.extend_from_slice(&25u32.to_be_bytes());
        map.rewrite_parameter_description(1, &mut params);
        assert_eq!(&params[2..6], &16499u32.to_be_bytes());
        // Parse frames: the client's OID becomes shard 1's.
        let mut frames = vec![b'P', 0, 0, 0, 0];
        frames.extend_from_slice(b"s\0select $1\0");
        frames.extend_from_slice(&[0, 1]);
        frames.extend_from_slice(&16500u32.to_be_bytes());
        let len = (frames.len() - 1) as u32;
        frames[1..5].copy_from_slice(&len.to_be_bytes());
        frames.extend_from_slice(&[b'S', 0, 0, 0, 4]);
        map.rewrite_parse_frames(1, &mut frames);
        assert_eq!(
            &frames[frames.len() - 9..frames.len() - 5],
            &16600u32.to_be_bytes()
        );
    }

    #[test]
    fn malformed_messages_are_left_alone() {
        let map = oids();
        for mut body in [vec![], vec![0], vec![0, 5, b'x'], vec![127, 255, 1, 2, 3]] {
            map.rewrite_row_description(1, &mut body);
            map.rewrite_parameter_description(1, &mut body);
            map.rewrite_parse(1, &mut body);
            map.rewrite_parse_frames(1, &mut body);
        }
    }
}
