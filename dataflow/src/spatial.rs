//! spatial
