//! SQL routing. For now: routing hints (`hints`); key extraction with
//! sqlparser comes with the router issue.

pub mod hints;
