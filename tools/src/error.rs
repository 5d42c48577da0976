//! The command line's one error type: a human sentence, printed as `nvaio: <message>`.
//!
//! The libraries' errors are precise enums; here they only need to read well. Any error converts
//! with its whole `source()` chain folded into one line, and [`Context`] puts what the command
//! was doing in front.

use std::error::Error as StdError;
use std::fmt;

/// A failed command, as one line of text.
#[derive(Debug)]
pub struct Error {
    message: String,
    /// Output went to a closed pipe (`nvaio list | head -1`): stop without a message.
    quiet: bool,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn msg(message: impl Into<String>) -> Error {
        Error { message: message.into(), quiet: false }
    }

    /// Whether this error should end the program without a message.
    pub fn is_quiet(&self) -> bool {
        self.quiet
    }

    fn from_std(e: &(dyn StdError + 'static)) -> Error {
        let quiet = e
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe);
        Error { message: chain(e), quiet }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E: StdError + 'static> From<E> for Error {
    fn from(e: E) -> Error {
        Error::from_std(&e)
    }
}

/// An error's message followed by those of its sources, skipping any source whose text the
/// message already quotes (many of the libraries' messages embed their source).
pub fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(source) = next {
        let s = source.to_string();
        if !s.is_empty() && !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        next = source.source();
    }
    text
}

/// Puts what was being done in front of an error: `cannot read in.bin: No such file`.
pub trait Context<T> {
    fn context(self, what: impl fmt::Display) -> Result<T>;
    fn with_context<D: fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T>;
}

impl<T, E: StdError + 'static> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| {
            let inner = Error::from_std(&e);
            Error { message: format!("{what}: {}", inner.message), quiet: inner.quiet }
        })
    }

    fn with_context<D: fmt::Display>(self, what: impl FnOnce() -> D) -> Result<T> {
        self.map_err(|e| {
            let inner = Error::from_std(&e);
            Error { message: format!("{}: {}", what(), inner.message), quiet: inner.quiet }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error, bool);

    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            if self.1 {
                write!(f, "outer: {}", self.0)
            } else {
                f.write_str("outer")
            }
        }
    }

    impl StdError for Outer {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn sources_are_folded_once() {
        let io = || std::io::Error::from_raw_os_error(libc::ENOENT);
        let plain = Error::from(Outer(io(), false)).to_string();
        assert!(plain.starts_with("outer: No such file"), "{plain}");
        let quoted = Error::from(Outer(io(), true)).to_string();
        assert_eq!(quoted.matches("No such file").count(), 1, "{quoted}");
    }

    #[test]
    fn context_and_broken_pipe() {
        let r: std::result::Result<(), _> =
            Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        let e = r.context("writing to stdout").unwrap_err();
        assert!(e.is_quiet());
        assert!(e.to_string().starts_with("writing to stdout: "));
        assert!(!Error::msg("x").is_quiet());
    }
}
