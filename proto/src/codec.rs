//! The reflex.v1 codec: prost, except that a *request* that does not decode is
//! the caller's fault and answered `INVALID_ARGUMENT` (tonic's prost codec says
//! `INTERNAL` for any message, which reads as a server bug). Responses that do
//! not decode stay `INTERNAL` on the client side. `build.rs` points the
//! generated services at [`ReflexCodec`].

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder};

/// Whether a message type travels client → server in some RPC.
pub trait Direction {
    const REQUEST: bool;
}

macro_rules! direction {
    ($request:expr => $($t:ty),+) => {
        $(impl Direction for $t { const REQUEST: bool = $request; })+
    };
}
direction!(true => crate::v1::ActRequest, crate::v1::GetModelInfoRequest,
    crate::v1::RecordEvent, crate::v1::StatusRequest);
direction!(false => crate::v1::ActResponse, crate::v1::ModelInfo,
    crate::v1::RecordSummary, crate::v1::RecorderStatus);

#[derive(Debug, Clone)]
pub struct ReflexCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for ReflexCodec<T, U> {
    fn default() -> Self {
        ReflexCodec(ProstCodec::default())
    }
}

impl<T, U> Codec for ReflexCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Direction + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = ReflexDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ReflexDecoder(self.0.decoder())
    }
}

pub struct ReflexDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default + Direction> Decoder for ReflexDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| {
            if U::REQUEST {
                let name = std::any::type_name::<U>()
                    .rsplit("::")
                    .next()
                    .unwrap_or("message");
                Status::invalid_argument(format!(
                    "the request is not a valid {name}: {}",
                    s.message()
                ))
            } else {
                s
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
