//! eta
