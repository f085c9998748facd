//! # stripe-webhook-guard
//!
//! Consume Stripe webhooks correctly.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod event;
pub mod signature;

// Compile every code block of the README as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
