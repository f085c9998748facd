//! `HttpStripeClient`: the Stripe API over reqwest (feature `reqwest`).
