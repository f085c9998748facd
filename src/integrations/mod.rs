//! Framework integrations.

#[cfg(feature = "axum")]
pub mod axum;
