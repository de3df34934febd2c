//! zc
