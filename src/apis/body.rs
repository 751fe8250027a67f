//! A response body translated to another API on its way: a stream event by event, a whole
//! answer once it is all there.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::{Event, EventReader};

/// Turns one API's stream events into another's bytes.
pub trait StreamTranslator: Send {
    /// The bytes to send for one event (often none: an event may only be remembered).
    fn event(&mut self, event: &Event) -> Vec<u8>;
    /// The stream ended: whatever is still to say (a clean end's closing events, or an error
    /// event for a stream cut short).
    fn finish(&mut self) -> Vec<u8>;
}

// The translators of `messages` and `responses` (their inherent methods, which these name):
// chat streams are read by their `data:` alone, Anthropic's by their event names too.
impl StreamTranslator for super::messages::FromChatStream {
    fn event(&mut self, event: &Event) -> Vec<u8> {
        super::messages::FromChatStream::event(self, &event.data)
    }

    fn finish(&mut self) -> Vec<u8> {
        super::messages::FromChatStream::finish(self)
    }
}

impl StreamTranslator for super::responses::FromChatStream {
    fn event(&mut self, event: &Event) -> Vec<u8> {
        super::responses::FromChatStream::event(self, &event.data)
    }

    fn finish(&mut self) -> Vec<u8> {
        super::responses::FromChatStream::finish(self)
    }
}

impl StreamTranslator for super::messages::ToChatStream {
    fn event(&mut self, event: &Event) -> Vec<u8> {
        super::messages::ToChatStream::event(self, event.name.as_deref(), &event.data)
    }

    fn finish(&mut self) -> Vec<u8> {
        super::messages::ToChatStream::finish(self)
    }
}

/// Turns a whole answer into another API's.
pub type WholeTranslator = Box<dyn FnOnce(&[u8]) -> Vec<u8> + Send>;

/// See the module doc.
pub struct Translated<B> {
    inner: B,
    how: How,
    ended: bool,
}

enum How {
    Stream { reader: EventReader, translator: Box<dyn StreamTranslator> },
    Whole { read: Vec<u8>, translate: Option<WholeTranslator>, limit: usize },
}

impl<B> Translated<B> {
    pub fn stream(inner: B, translator: Box<dyn StreamTranslator>) -> Self {
        Self { inner, how: How::Stream { reader: EventReader::default(), translator }, ended: false }
    }

    /// A whole answer, read up to `limit` bytes; a larger one passes untranslated (the reader
    /// downstream refuses it as too large).
    pub fn whole(inner: B, translate: WholeTranslator, limit: usize) -> Self {
        Self { inner, how: How::Whole { read: Vec::new(), translate: Some(translate), limit }, ended: false }
    }
}

impl<B> Body for Translated<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        loop {
            let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
            match (frame, &mut this.how) {
                (Some(Err(e)), _) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(e)));
                }
                (Some(Ok(frame)), how) => {
                    let Ok(bytes) = frame.into_data() else { continue };
                    match how {
                        How::Stream { reader, translator } => {
                            let out: Vec<u8> = reader.feed(&bytes).iter().flat_map(|e| translator.event(e)).collect();
                            if !out.is_empty() {
                                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                            }
                        }
                        How::Whole { read, translate, limit } => {
                            if translate.is_some() && read.len() + bytes.len() <= *limit {
                                read.extend_from_slice(&bytes);
                            } else {
                                // Too large to translate: what was read, then the rest, as it is.
                                translate.take();
                                let mut out = std::mem::take(read);
                                out.extend_from_slice(&bytes);
                                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                            }
                        }
                    }
                }
                (None, how) => {
                    this.ended = true;
                    let out = match how {
                        How::Stream { reader, translator } => {
                            let mut out = reader.finish().map(|e| translator.event(&e)).unwrap_or_default();
                            out.extend(translator.finish());
                            out
                        }
                        How::Whole { read, translate, .. } => match translate.take() {
                            Some(translate) => translate(read),
                            None => std::mem::take(read),
                        },
                    };
                    return Poll::Ready((!out.is_empty()).then(|| Ok(Frame::data(Bytes::from(out)))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    struct Upper;

    impl StreamTranslator for Upper {
        fn event(&mut self, event: &Event) -> Vec<u8> {
            format!("{}|", event.data.to_uppercase()).into_bytes()
        }
        fn finish(&mut self) -> Vec<u8> {
            b"end".to_vec()
        }
    }

    fn pieces(parts: &[&'static str]) -> StreamBody<frames::Iter> {
        StreamBody::new(frames::iter(parts))
    }

    /// A tiny stream of frames without pulling in a futures crate.
    mod frames {
        use super::*;
        pub struct Iter(std::vec::IntoIter<&'static str>);
        pub fn iter(parts: &[&'static str]) -> Iter {
            Iter(Vec::from(parts).into_iter())
        }
        impl futures_core::Stream for Iter {
            type Item = Result<Frame<Bytes>, std::convert::Infallible>;
            fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
                Poll::Ready(self.0.next().map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes())))))
            }
        }
    }

    #[tokio::test]
    async fn a_stream_is_translated_event_by_event_however_it_is_split() {
        let body = Translated::stream(pieces(&["data: a\n", "\ndata: b", "c\n\ndata: tail"]), Box::new(Upper));
        let out = body.collect().await.unwrap().to_bytes();
        assert_eq!(&out[..], b"A|BC|TAIL|end");
    }

    #[tokio::test]
    async fn a_whole_answer_is_translated_once_and_a_too_large_one_passes_as_it_is() {
        let translate: WholeTranslator = Box::new(|read: &[u8]| [b"<", read, b">"].concat());
        let body = Translated::whole(pieces(&["{\"a\":", "1}"]), translate, 100);
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"<{\"a\":1}>");
        let translate: WholeTranslator = Box::new(|read: &[u8]| [b"<", read, b">"].concat());
        let body = Translated::whole(pieces(&["{\"a\":", "1}"]), translate, 6);
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"{\"a\":1}");
    }
}
