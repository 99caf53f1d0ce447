//! How errors reach an operator: the whole cause chain on one line, each
//! cause once.

use std::{error::Error, fmt};

/// Displays an error and its sources joined by ": ", leaving out a source
/// whose text the line already holds: our errors do not repeat their
/// source, but some libraries' errors print their cause in their message
/// and return it as `source()` too.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = self.0.to_string();
        let mut source = self.0.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !text.is_empty() && !line.contains(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            source = cause.source();
        }
        f.write_str(&line)
    }
}

/// [`Chain`] for an `anyhow::Error`.
pub fn chain(err: &anyhow::Error) -> Chain<'_> {
    Chain(err.as_ref())
}
