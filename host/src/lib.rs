//! zc-host
