//! Target `rpc_frame`: bytes from a peer's RPC stream, through the frame
//! guard and Cap'n Proto's stream framing with the server's reader options,
//! each message then read in full as every request and result struct of the
//! schema (and as the RPC envelope).

use std::hint::black_box;
use std::sync::OnceLock;

use quicnprotochat_proto::capnp::message::{self, ReaderSegments};
use quicnprotochat_proto::capnp::serialize::OwnedSegments;
use quicnprotochat_proto::capnp::traits::FromPointerReader;
use quicnprotochat_proto::capnp::{self, dynamic_value};
use quicnprotochat_proto::capnp_rpc::rpc_capnp;
use quicnprotochat_proto::framing::FrameGuard;
use quicnprotochat_proto::rpc::{default_frame_limits, reader_options};
use quicnprotochat_proto::schema::{listener, service, session};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a tokio runtime")
    })
}

/// Reads `data` as the incoming half of an RPC stream.
pub fn check(data: &[u8]) {
    runtime().block_on(async {
        // The same layering as `quicnprotochat_proto::rpc::rpc_system`.
        let guarded = FrameGuard::new(futures::io::Cursor::new(data), default_frame_limits());
        let mut stream = futures::io::BufReader::new(guarded);
        while let Ok(Some(msg)) =
            capnp_futures::serialize::try_read_message(&mut stream, reader_options()).await
        {
            read_as_every_struct(msg);
        }
    });
}

/// Reads the message as each struct in turn, each time with fresh reader
/// limits (the traversal limit is spent per message, as on the server,
/// which reads a message as one type).
fn read_as_every_struct(msg: message::Reader<OwnedSegments>) {
    macro_rules! each {
        ($msg:ident: $($t:ty),* $(,)?) => {{
            let segments = $msg.into_segments();
            $(
                let $msg = message::Reader::new(&segments, reader_options());
                let _ = walk_root::<$t, _>(&$msg);
            )*
        }};
    }
    each!(msg:
        rpc_capnp::message::Reader<'_>,
        service::health_params::Reader<'_>,
        service::health_results::Reader<'_>,
        service::challenge_params::Reader<'_>,
        service::challenge_results::Reader<'_>,
        service::authenticate_params::Reader<'_>,
        service::authenticate_results::Reader<'_>,
        session::register_params::Reader<'_>,
        session::register_results::Reader<'_>,
        session::resolve_params::Reader<'_>,
        session::resolve_results::Reader<'_>,
        session::publish_key_packages_params::Reader<'_>,
        session::publish_key_packages_results::Reader<'_>,
        session::fetch_key_package_params::Reader<'_>,
        session::fetch_key_package_results::Reader<'_>,
        session::key_package_count_params::Reader<'_>,
        session::key_package_count_results::Reader<'_>,
        session::enqueue_params::Reader<'_>,
        session::enqueue_results::Reader<'_>,
        session::fetch_params::Reader<'_>,
        session::fetch_results::Reader<'_>,
        session::ack_params::Reader<'_>,
        session::ack_results::Reader<'_>,
        session::subscribe_params::Reader<'_>,
        session::subscribe_results::Reader<'_>,
        listener::deliver_params::Reader<'_>,
        listener::deliver_results::Reader<'_>,
    );
}

fn walk_root<'a, T, S>(msg: &'a message::Reader<S>) -> capnp::Result<()>
where
    T: FromPointerReader<'a> + Into<dynamic_value::Reader<'a>>,
    S: ReaderSegments,
{
    walk(msg.get_root::<T>()?.into())
}

/// Reads every field, list element and byte reachable from `value`.  A bad
/// field does not stop the others from being read.
fn walk(value: dynamic_value::Reader<'_>) -> capnp::Result<()> {
    match value {
        dynamic_value::Reader::Text(t) => {
            let _ = black_box(t.to_str());
        }
        dynamic_value::Reader::Data(d) => {
            black_box(d.iter().fold(0u8, |a, b| a ^ b));
        }
        dynamic_value::Reader::List(list) => {
            for item in list.iter() {
                let _ = item.and_then(walk);
            }
        }
        dynamic_value::Reader::Struct(s) => {
            // Set fields only: the active union member, non-null pointers
            // (a null one reads as its default, and following defaults
            // through a recursive schema would never end).
            for field in s.get_schema().get_fields()? {
                if s.has(field).unwrap_or(false) {
                    let _ = s.get(field).and_then(walk);
                }
            }
        }
        dynamic_value::Reader::Enum(e) => {
            let _ = black_box(e.get_enumerant());
        }
        dynamic_value::Reader::AnyPointer(p) => {
            let _ = black_box(p.target_size());
        }
        other => {
            black_box(other);
        }
    }
    Ok(())
}
