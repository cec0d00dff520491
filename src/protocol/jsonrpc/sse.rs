//! The events of a `text/event-stream` body (the WHATWG HTML "Server-sent events" parsing
//! rules), as far as a replay needs them: where each event's `data` lines are.
//!
//! Lines end with CRLF, LF or CR; a blank line dispatches the event; `data:` drops one space
//! after the colon; comments (`:`) and other fields are kept as they are and skipped here. An
//! event not ended by a blank line is not dispatched, as a browser would not.

use std::ops::Range;

/// One dispatched event: the spans of its `data` lines' values, in order.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Event {
    pub(crate) data: Vec<Range<usize>>,
}

impl Event {
    /// The event's data: its lines joined by LF, borrowed when there is one line.
    pub(crate) fn data<'a>(&self, body: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        match self.data.as_slice() {
            [one] => std::borrow::Cow::Borrowed(&body[one.clone()]),
            lines => {
                let mut joined = Vec::new();
                for (i, line) in lines.iter().enumerate() {
                    if i > 0 {
                        joined.push(b'\n');
                    }
                    joined.extend_from_slice(&body[line.clone()]);
                }
                std::borrow::Cow::Owned(joined)
            }
        }
    }

    /// Where a span of the joined data is in the body, if it lies within one line (a JSON
    /// token never spans a line: strings cannot hold a raw line break).
    pub(crate) fn locate(&self, span: Range<usize>) -> Option<Range<usize>> {
        let mut offset = 0;
        for line in &self.data {
            let len = line.end - line.start;
            if span.start >= offset && span.end <= offset + len {
                let start = line.start + span.start - offset;
                return Some(start..start + span.end - span.start);
            }
            offset += len + 1;
        }
        None
    }
}

/// The events `body` dispatches, with data.
pub(crate) fn events(body: &[u8]) -> Vec<Event> {
    let mut events = Vec::new();
    let mut current = Event::default();
    // A leading byte order mark is not part of the first line.
    let mut at = if body.starts_with("\u{feff}".as_bytes()) {
        3
    } else {
        0
    };
    while at < body.len() {
        let rest = &body[at..];
        let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') else {
            // The last line has no end: the event it belongs to is never dispatched.
            break;
        };
        let line = at..at + end;
        at += end + 1;
        if rest[end] == b'\r' && body.get(at) == Some(&b'\n') {
            at += 1;
        }
        if line.is_empty() {
            if !current.data.is_empty() {
                events.push(std::mem::take(&mut current));
            }
            continue;
        }
        let text = &body[line.clone()];
        let (field, value_start) = match text.iter().position(|&b| b == b':') {
            Some(0) => continue,
            Some(colon) => {
                let space = usize::from(text.get(colon + 1) == Some(&b' '));
                (&text[..colon], line.start + colon + 1 + space)
            }
            None => (text, line.end),
        };
        if field == b"data" {
            current.data.push(value_start..line.end);
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datas(body: &str) -> Vec<String> {
        events(body.as_bytes())
            .iter()
            .map(|event| String::from_utf8(event.data(body.as_bytes()).into_owned()).unwrap())
            .collect()
    }

    #[test]
    fn events_are_read_as_a_browser_reads_them() {
        let cases: [(&str, &[&str]); 11] = [
            ("data: {\"id\":1}\n\n", &["{\"id\":1}"]),
            ("data:{\"id\":1}\r\n\r\n", &["{\"id\":1}"]),
            ("data: a\rdata: b\r\r", &["a\nb"]),
            (
                "id: 0\nretry: 3000\ndata: \n\nevent: message\ndata: x\nid: 1\n\n",
                &["", "x"],
            ),
            (": keep-alive\n\ndata:  two spaces\n\n", &[" two spaces"]),
            ("data\n\n", &[""]),
            ("\u{feff}data: bom\n\n", &["bom"]),
            ("event: message\n\n", &[]),
            ("data: never dispatched\n", &[]),
            ("data: first\n\ndata: cut", &["first"]),
            ("dataX: not data\ndata: y\n\n", &["y"]),
        ];
        for (body, expected) in cases {
            assert_eq!(datas(body), expected, "{body:?}");
        }
    }

    #[test]
    fn a_span_of_joined_data_is_found_in_its_line() {
        let body = "data: {\"a\":\ndata: \"id\":7}\n\n";
        let event = &events(body.as_bytes())[0];
        let joined = event.data(body.as_bytes());
        let seven = joined.iter().position(|&b| b == b'7').unwrap();
        let located = event.locate(seven..seven + 1).unwrap();
        assert_eq!(&body[located], "7");
        // Across the joining line break: in no single line.
        let across = joined.iter().position(|&b| b == b'\n').unwrap();
        assert_eq!(event.locate(across - 1..across + 1), None);
    }
}
