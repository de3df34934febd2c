//! zc-guest
