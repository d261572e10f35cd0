//! The client side of the proxy: TLS and startup (`startup`), authentication
//! material (`auth`), the per-client message loop (`session`) with its
//! response ordering (`responses`), prepared statements (`prepared`) and
//! session settings (`settings`) for transaction pooling, and cancel routing.

pub mod auth;
pub mod buffers;
pub mod cancel;
pub mod encoding;
pub mod limits;
pub mod prepared;
pub mod prepared_view;
pub mod presence;
pub mod responses;
pub mod session;
pub mod settings;
pub mod startup;
pub mod stop;
pub mod tls;
