//! Emulated controller: being written.
