//! Target `rpc_frame`: bytes from a peer's RPC stream, through the frame
//! guard and Cap'n Proto's stream framing with the server's reader options,
//! each message then read in full as every request and result struct of the
//! schema.

use std::hint::black_box;
use std::sync::OnceLock;

use quicnprotochat_proto::capnp::{self, message, serialize::OwnedSegments};
use quicnprotochat_proto::framing::FrameGuard;
use quicnprotochat_proto::rpc::{default_frame_limits, reader_options};
use quicnprotochat_proto::schema::{self, listener, service, session};

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
/// which reads a message as one type).  Every field is read through the
/// generated accessors, as the server and the client read them: texts are
/// checked for UTF-8, every byte of data and every list element is touched.
fn read_as_every_struct(msg: message::Reader<OwnedSegments>) {
    let segments = msg.into_segments();
    macro_rules! each {
        ($($t:ty => $read:expr),* $(,)?) => {$(
            let msg = message::Reader::new(&segments, reader_options());
            if let Ok(r) = msg.get_root::<$t>() {
                let read: fn($t) = $read;
                read(r);
            }
        )*};
    }
    each!(
        service::health_params::Reader<'_> => |_| {},
        service::health_results::Reader<'_> => |r| {
            if let Ok(h) = r.get_health() {
                black_box((h.get_ok(), h.get_wire_version(), h.get_store_reachable()));
                text(h.get_server_version());
            }
        },
        service::challenge_params::Reader<'_> => |r| {
            black_box(r.get_wire_version());
        },
        service::challenge_results::Reader<'_> => |r| {
            error(r.get_error());
            data(r.get_nonce());
        },
        service::authenticate_params::Reader<'_> => |r| {
            if let Ok(a) = r.get_request() {
                black_box(a.get_wire_version());
                data(a.get_access_token());
                data(a.get_identity_key());
                data(a.get_signature());
            }
        },
        service::authenticate_results::Reader<'_> => |r| {
            error(r.get_error());
            let _ = black_box(r.get_session());
        },
        session::register_params::Reader<'_> => |r| text(r.get_username()),
        session::register_results::Reader<'_> => |r| error(r.get_error()),
        session::resolve_params::Reader<'_> => |r| text(r.get_username()),
        session::resolve_results::Reader<'_> => |r| {
            error(r.get_error());
            data(r.get_identity_key());
        },
        session::publish_key_packages_params::Reader<'_> => |r| data_list(r.get_key_packages()),
        session::publish_key_packages_results::Reader<'_> => |r| {
            error(r.get_error());
            black_box(r.get_stored());
        },
        session::fetch_key_package_params::Reader<'_> => |r| data(r.get_identity_key()),
        session::fetch_key_package_results::Reader<'_> => |r| {
            error(r.get_error());
            data(r.get_key_package());
            black_box(r.get_last_resort());
        },
        session::key_package_count_params::Reader<'_> => |_| {},
        session::key_package_count_results::Reader<'_> => |r| {
            error(r.get_error());
            black_box((r.get_count(), r.get_has_last_resort()));
        },
        session::enqueue_params::Reader<'_> => |r| {
            data_list(r.get_recipients());
            data(r.get_message_id());
            data(r.get_payload());
            data_list(r.get_tokens());
        },
        session::enqueue_results::Reader<'_> => |r| {
            error(r.get_error());
            black_box(r.get_duplicate());
            if let Ok(seqs) = r.get_seqs() {
                black_box(seqs.iter().fold(0u64, u64::wrapping_add));
            }
        },
        session::fetch_params::Reader<'_> => |r| {
            data(r.get_recipient());
            black_box((r.get_from_seq(), r.get_limit()));
        },
        session::fetch_results::Reader<'_> => |r| {
            error(r.get_error());
            envelopes(r.get_messages());
            data(r.get_incarnation());
        },
        session::ack_params::Reader<'_> => |r| {
            data(r.get_recipient());
            black_box(r.get_up_to_seq());
            data(r.get_incarnation());
        },
        session::ack_results::Reader<'_> => |r| {
            error(r.get_error());
            black_box(r.get_removed());
        },
        session::subscribe_params::Reader<'_> => |r| {
            data(r.get_recipient());
            black_box(r.get_from_seq());
            let _ = black_box(r.get_listener());
        },
        session::subscribe_results::Reader<'_> => |r| {
            error(r.get_error());
            let _ = black_box(r.get_subscription());
            data(r.get_incarnation());
        },
        session::set_delivery_token_params::Reader<'_> => |r| data(r.get_token()),
        session::set_delivery_token_results::Reader<'_> => |r| error(r.get_error()),
        listener::deliver_params::Reader<'_> => |r| envelopes(r.get_messages()),
        listener::deliver_results::Reader<'_> => |_| {},
    );
}

fn data(d: capnp::Result<capnp::data::Reader<'_>>) {
    if let Ok(d) = d {
        black_box(d.iter().fold(0u8, |a, b| a ^ b));
    }
}

fn text(t: capnp::Result<capnp::text::Reader<'_>>) {
    if let Ok(t) = t {
        let _ = black_box(t.to_str());
    }
}

fn data_list(l: capnp::Result<capnp::data_list::Reader<'_>>) {
    if let Ok(l) = l {
        for d in l.iter() {
            data(d);
        }
    }
}

fn error(e: capnp::Result<schema::error::Reader<'_>>) {
    if let Ok(e) = e {
        let _ = black_box(e.get_code());
        text(e.get_message());
        black_box(e.get_retry_after_ms());
    }
}

fn envelopes(l: capnp::Result<capnp::struct_list::Reader<'_, schema::envelope::Owned>>) {
    if let Ok(l) = l {
        for e in l.iter() {
            black_box((e.get_seq(), e.get_enqueued_at_ms()));
            data(e.get_message_id());
            data(e.get_payload());
            data(e.get_incarnation());
        }
    }
}
