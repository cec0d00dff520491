//! The data frames of a body, taken so far: kept for a record or a fingerprint, and read by
//! the client of a streamed response while more arrive. Pure: bytes only.

use bytes::{Bytes, BytesMut};

/// Data frames shorter than this are copied together rather than kept one by one: a body
/// of tiny frames then costs its bytes, not a `Bytes` and an allocation of its own for each
/// (a stream of one-byte frames held 131 bytes per byte of data).
pub(crate) const COALESCE_BELOW: usize = 1024;

/// Data frames taken so far: the first one as it came (a body of one frame is handed on
/// without a copy or a `Vec`); after it, frames of at least [`COALESCE_BELOW`] bytes as they
/// came, and shorter ones copied together into `tail`. Empty frames take no room.
#[derive(Default)]
pub(crate) struct Chunks {
    first: Option<Bytes>,
    rest: Vec<Bytes>,
    /// Short frames after the first, copied together; the piece after `rest`.
    tail: BytesMut,
    pub(crate) len: usize,
}

/// A reader's place in [`Chunks`]: a piece (`first` is 0, `rest` follow, then `tail`) and the
/// bytes of it already read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cursor {
    piece: usize,
    offset: usize,
    /// Bytes read in all.
    pub(crate) read: usize,
}

impl Chunks {
    pub(crate) fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        self.len += data.len();
        if self.first.is_none() {
            self.first = Some(data);
        } else if data.len() < COALESCE_BELOW {
            self.tail.extend_from_slice(&data);
        } else {
            self.seal_tail();
            self.rest.push(data);
        }
    }

    /// Ends the tail as a piece of `rest` (a reader inside it stays where it was: the tail's
    /// index becomes the new piece's).
    fn seal_tail(&mut self) {
        if !self.tail.is_empty() {
            self.rest.push(self.tail.split().freeze());
        }
    }

    /// Whether nothing (or only empty frames) was taken.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many pieces hold the data: at most one per frame, fewer for short frames.
    #[cfg(test)]
    pub(crate) fn pieces(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len() + usize::from(!self.tail.is_empty())
    }

    /// The bytes held, with what the tail reserved beyond its data.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.len + (self.tail.capacity() - self.tail.len())
    }

    /// The data after `at`, as one `Bytes` (a whole piece is shared, not copied; the tail's
    /// bytes are copied out, since more are still appended to it), moving `at` past it;
    /// `None` once `at` is at the end.
    pub(crate) fn read(&self, at: &mut Cursor) -> Option<Bytes> {
        let sealed = usize::from(self.first.is_some()) + self.rest.len();
        while at.piece < sealed {
            let piece = match at.piece {
                0 => self.first.as_ref(),
                n => self.rest.get(n - 1),
            }?;
            let offset = at.offset.min(piece.len());
            at.piece += 1;
            at.offset = 0;
            if offset < piece.len() {
                at.read += piece.len() - offset;
                return Some(piece.slice(offset..));
            }
        }
        let unread = self
            .tail
            .get(at.offset..)
            .filter(|unread| !unread.is_empty())?;
        at.offset = self.tail.len();
        at.read += unread.len();
        Some(Bytes::copy_from_slice(unread))
    }

    /// The pieces, in order, without copying any (the tail becomes one piece).
    pub(crate) fn into_vec(mut self) -> Vec<Bytes> {
        self.seal_tail();
        let mut all = Vec::with_capacity(usize::from(self.first.is_some()) + self.rest.len());
        all.extend(self.first);
        all.extend(self.rest);
        all
    }

    /// Joins the chunks; a single chunk is handed on as it is, without a copy.
    pub(crate) fn concat(self) -> Bytes {
        match self.first {
            None => Bytes::new(),
            Some(first) if self.rest.is_empty() && self.tail.is_empty() => first,
            Some(first) => {
                let mut joined = BytesMut::with_capacity(self.len);
                joined.extend_from_slice(&first);
                for chunk in &self.rest {
                    joined.extend_from_slice(chunk);
                }
                joined.extend_from_slice(&self.tail);
                joined.freeze()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_chunk_is_kept_without_copying() {
        let chunk = Bytes::from(vec![1, 2, 3]);
        let pointer = chunk.as_ptr();
        let mut one = Chunks::default();
        one.push(chunk);
        assert_eq!(one.concat().as_ptr(), pointer);
        assert_eq!(Chunks::default().concat(), Bytes::new());
        let mut two = Chunks::default();
        two.push(Bytes::from_static(b"a"));
        two.push(Bytes::from_static(b"b"));
        assert_eq!(two.pieces(), 2);
        assert_eq!(two.concat(), Bytes::from_static(b"ab"));
    }

    #[test]
    fn short_frames_are_copied_together_and_empty_ones_take_no_room() {
        let mut chunks = Chunks::default();
        for _ in 0..100_000 {
            chunks.push(Bytes::from_static(b"x"));
            chunks.push(Bytes::new());
        }
        assert_eq!(chunks.len, 100_000);
        assert_eq!(chunks.pieces(), 2, "the first frame, then one buffer");
        assert!(chunks.held() <= 2 * chunks.len, "held {}", chunks.held());
        chunks.push(Bytes::from(vec![b'L'; COALESCE_BELOW]));
        chunks.push(Bytes::from_static(b"y"));
        assert_eq!(chunks.pieces(), 4);
        let joined = chunks.concat();
        assert_eq!(joined.len(), 100_000 + COALESCE_BELOW + 1);
        assert!(joined[..100_000].iter().all(|b| *b == b'x'));
        assert!(
            joined[100_000..100_000 + COALESCE_BELOW]
                .iter()
                .all(|b| *b == b'L')
        );
        assert_eq!(joined.last(), Some(&b'y'));
        // A large frame is kept as it came, and read without a copy.
        let mut again = Chunks::default();
        again.push(Bytes::from_static(b"first"));
        let large = Bytes::from(vec![b'L'; COALESCE_BELOW]);
        let pointer = large.as_ptr();
        again.push(large);
        let mut at = Cursor::default();
        assert_eq!(again.read(&mut at).unwrap(), "first");
        assert_eq!(again.read(&mut at).unwrap().as_ptr(), pointer);
        assert!(again.read(&mut at).is_none());
    }

    /// Table: frame sizes pushed, with reads between them (`None`): the reader gets every
    /// byte once, in order, whatever the tail became meanwhile.
    #[test]
    fn a_reader_gets_every_byte_once_in_order_while_frames_are_pushed() {
        let big = COALESCE_BELOW;
        let cases: &[&[Option<usize>]] = &[
            &[Some(5), None, Some(3), None, Some(big), None],
            &[
                Some(5),
                Some(3),
                None,
                Some(2),
                None,
                Some(big),
                Some(1),
                None,
            ],
            &[
                Some(1),
                Some(1),
                None,
                Some(1),
                Some(big + 1),
                Some(1),
                None,
                Some(1),
                None,
            ],
            &[Some(big), Some(big), None, Some(7), None, Some(0), None],
            &[None, Some(0), None, Some(4), Some(4), Some(4), None],
        ];
        for (case, steps) in cases.iter().enumerate() {
            let (mut chunks, mut at) = (Chunks::default(), Cursor::default());
            let (mut sent, mut got) = (Vec::new(), Vec::new());
            let mut n = 0u8;
            for step in *steps {
                match step {
                    Some(len) => {
                        let frame: Vec<u8> = (0..*len)
                            .map(|_| {
                                n = n.wrapping_add(1);
                                n
                            })
                            .collect();
                        sent.extend_from_slice(&frame);
                        chunks.push(Bytes::from(frame));
                    }
                    None => {
                        while let Some(data) = chunks.read(&mut at) {
                            got.extend_from_slice(&data);
                        }
                    }
                }
            }
            assert_eq!(got, sent, "case {case}");
            assert_eq!(at.read, sent.len(), "case {case}");
        }
    }
}
