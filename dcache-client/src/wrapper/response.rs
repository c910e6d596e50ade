//! Response files (`@file` arguments): gcc reads further arguments from them, so the
//! wrapper must too before it decides whether a compile can be distributed.

use std::ffi::OsString;

/// A response file that cannot be read. The wrapper then compiles locally and lets the
/// compiler read (or report) it, so the user sees the compiler's own message.
#[derive(Debug, thiserror::Error)]
#[error("@{path}: {source}")]
pub struct ResponseFileError {
    /// The file, as the argument named it.
    pub path: String,
    /// Why it cannot be read.
    #[source]
    pub source: std::io::Error,
}

/// Expands `@file` arguments (gcc's response files) so the plan sees every option: an
/// option hidden in a response file (`-E`, `-march=native`) must keep a compile local
/// exactly as it would on the command line.
pub fn expand_response_files(args: Vec<OsString>) -> Result<Vec<OsString>, ResponseFileError> {
    let mut out = Vec::with_capacity(args.len());
    for a in args {
        match a.to_str().and_then(|s| s.strip_prefix('@')) {
            Some(path) if !path.is_empty() => {
                let text = std::fs::read_to_string(path).map_err(|source| ResponseFileError {
                    path: path.to_owned(),
                    source,
                })?;
                out.extend(split_response(&text).into_iter().map(OsString::from));
            }
            _ => out.push(a),
        }
    }
    Ok(out)
}

/// Splits a response file's text as gcc does: whitespace-separated arguments, with
/// single or double quotes and backslash escapes (an empty quoted pair is an empty
/// argument).
pub fn split_response(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote = None;
    let mut any = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (c, quote) {
            ('\\', _) => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                    any = true;
                }
            }
            ('"' | '\'', None) => {
                quote = Some(c);
                any = true;
            }
            (c, Some(q)) if c == q => quote = None,
            (c, None) if c.is_whitespace() => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (c, _) => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_files_expand_in_place_and_a_missing_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("args");
        std::fs::write(&file, "-O2 'a b.c'\n").unwrap();
        let at = format!("@{}", file.display());
        let out = expand_response_files(vec!["-c".into(), at.into(), "@".into()]).unwrap();
        assert_eq!(out, ["-c", "-O2", "a b.c", "@"]);
        let missing = format!("@{}", dir.path().join("none").display());
        let e = expand_response_files(vec![missing.clone().into()]).unwrap_err();
        assert!(e.to_string().starts_with(&format!("{missing}: ")));
    }

    #[test]
    fn response_files_split_like_gcc() {
        assert_eq!(
            split_response("-c  a.c\n-DX=\"a b\" 'c d' e\\ f \"\""),
            ["-c", "a.c", "-DX=a b", "c d", "e f", ""]
        );
    }
}
