//! The kubelet's downward-API rendering of `metadata.annotations`: one `key="value"` line per annotation,
//! sorted by key, each value quoted as Go's `strconv.Quote` does. Read strictly: a line that does not
//! parse (a truncated or foreign file) is an error naming the line, never a partial map.
use std::collections::BTreeMap;

/// Files larger than this are refused: the API server caps all annotations of an object at 256 KiB.
pub const MAX_FILE_BYTES: usize = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    #[error("the annotations file is {0} bytes, over the {MAX_FILE_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("annotations file line {line}: {reason}")]
    Line { line: usize, reason: String },
}

/// Parses the whole file.
pub fn parse(text: &str) -> Result<BTreeMap<String, String>, FileError> {
    if text.len() > MAX_FILE_BYTES {
        return Err(FileError::TooLarge(text.len()));
    }
    let mut map = BTreeMap::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
        let bad = |reason: String| FileError::Line { line: i + 1, reason };
        let (key, quoted) = line.split_once('=').ok_or_else(|| bad("no '=' after the key".into()))?;
        let value = unquote(quoted).map_err(|r| bad(format!("value of {key}: {r}")))?;
        map.insert(key.to_string(), value);
    }
    Ok(map)
}

/// Renders a map as the kubelet does (used by tests and by tools that stand in for a kubelet).
pub fn render(map: &BTreeMap<String, String>) -> String {
    map.iter().map(|(k, v)| format!("{k}={}", quote(v))).collect::<Vec<_>>().join("\n")
}

/// Go's `strconv.Quote` for what JSON annotations contain: printable characters kept, the rest escaped.
fn quote(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The inverse of Go's `strconv.Quote`.
fn unquote(q: &str) -> Result<String, String> {
    let inner = q
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .filter(|_| q.len() >= 2)
        .ok_or("not a double-quoted string (truncated?)")?;
    let mut out: Vec<u8> = Vec::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '"' {
            return Err("unescaped quote inside the value".into());
        }
        if c != '\\' {
            out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
            continue;
        }
        let simple = |b: u8| Ok::<_, String>(vec![b]);
        let bytes = match chars.next().ok_or("escape at the end of the value")? {
            'a' => simple(7),
            'b' => simple(8),
            'f' => simple(12),
            'n' => simple(b'\n'),
            'r' => simple(b'\r'),
            't' => simple(b'\t'),
            'v' => simple(11),
            '\\' => simple(b'\\'),
            '"' => simple(b'"'),
            '\'' => simple(b'\''),
            'x' => hex_digits(&mut chars, 2).map(|n| vec![n as u8]),
            'u' => hex_digits(&mut chars, 4).and_then(char_bytes),
            'U' => hex_digits(&mut chars, 8).and_then(char_bytes),
            d @ '0'..='7' => octal(d, &mut chars).map(|n| vec![n]),
            other => Err(format!("unknown escape \\{other}")),
        }?;
        out.extend_from_slice(&bytes);
    }
    String::from_utf8(out).map_err(|_| "the value is not UTF-8".into())
}

fn hex_digits(chars: &mut std::str::Chars<'_>, n: usize) -> Result<u32, String> {
    let digits: String = chars.by_ref().take(n).collect();
    if digits.len() != n {
        return Err("short hex escape".into());
    }
    u32::from_str_radix(&digits, 16).map_err(|_| format!("bad hex escape {digits:?}"))
}

fn char_bytes(n: u32) -> Result<Vec<u8>, String> {
    let c = char::from_u32(n).ok_or(format!("escape \\u{n:x} is not a character"))?;
    Ok(c.encode_utf8(&mut [0; 4]).as_bytes().to_vec())
}

fn octal(first: char, chars: &mut std::str::Chars<'_>) -> Result<u8, String> {
    let rest: String = chars.by_ref().take(2).collect();
    let digits = format!("{first}{rest}");
    u8::from_str_radix(&digits, 8).map_err(|_| format!("bad octal escape {digits:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_what_a_kubelet_writes() {
        let text = "agentmesh.dev/links=\"1\"\nagentmesh.dev/peers=\"[{\\\"nodeId\\\":\\\"ab\\\",\\\"url\\\":\\\"ws://10.0.0.1:3001/crdt-sync\\\"}]\"\nnote=\"caf\u{e9} \\u00e9\\x41\\101\\t\"";
        let map = parse(text).unwrap();
        assert_eq!(map["agentmesh.dev/peers"], r#"[{"nodeId":"ab","url":"ws://10.0.0.1:3001/crdt-sync"}]"#);
        assert_eq!(map["note"], "caf\u{e9} \u{e9}AA\t");
    }

    /// The test vector of docs/agent-integration.md: a file as a kubelet writes it, escapes included.
    #[test]
    fn the_documented_test_vector() {
        let map = parse(include_str!("../tests/vectors/annotations")).unwrap();
        assert_eq!(map["note"], "caf\u{e9} \u{e9}AA\t\\");
        let a = crate::assignment::Assignment::from_annotations_strict(&map).unwrap().unwrap();
        let peer = &a.peers[0];
        assert_eq!(peer.node_id, "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
        assert_eq!(peer.url, "wss://10.0.3.7:3001/crdt-sync");
        let accepts: Vec<&str> = a.accepts.iter().map(|id| id.as_str()).collect();
        assert_eq!(accepts, ["3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"]);
        assert_eq!((a.links(), a.policy.as_str(), a.max_peers), (2, "build-agents", Some(4)));
    }

    #[test]
    fn a_truncated_line_is_an_error_naming_it() {
        let err = parse("a=\"1\"\nagentmesh.dev/peers=\"[{\\\"node").unwrap_err();
        assert!(matches!(err, FileError::Line { line: 2, .. }), "{err}");
        assert!(parse("a=\"x\\\"").is_err());
        assert!(parse("novalue").is_err());
        assert!(parse("a=\"\\xff\"").unwrap_err().to_string().contains("UTF-8"));
        assert!(matches!(parse(&"x".repeat(MAX_FILE_BYTES + 1)), Err(FileError::TooLarge(_))));
    }

    proptest! {
        #[test]
        fn render_then_parse_is_identity(map in proptest::collection::btree_map("[a-z./-]{1,20}", any::<String>(), 0..6)) {
            prop_assert_eq!(parse(&render(&map)).unwrap(), map);
        }

        #[test]
        fn any_text_parses_or_errs_without_panic(text in any::<String>()) {
            let _ = parse(&text);
        }
    }
}
