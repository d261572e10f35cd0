//! Executor: what happens to a statement once the router has decided where
//! it goes (ARCHITECTURE §1). This branch holds the control-statement helper
//! and the two-phase-commit coordinator with its recovery.

pub mod control;
pub mod recovery;
pub mod twophase;
