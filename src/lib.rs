//! # stripe-webhook-guard
//!
//! Consume Stripe webhooks correctly.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod access;
pub mod client;
pub mod clock;
pub mod event;
pub mod inbox;
pub mod integrations;
pub mod ledger;
pub mod processor;
pub mod reconcile;
pub mod signature;
#[cfg(feature = "test-util")]
pub mod sim;
pub mod store;
pub mod subscription;

// Compile every code block of the README as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
