//! Privileged end-to-end tests.
