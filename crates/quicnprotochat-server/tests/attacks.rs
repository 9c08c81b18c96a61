//! Hostile input on the wire: the server closes the offending connection,
//! never panics, and keeps serving everyone else.

use std::time::Duration;

use quicnprotochat_client::harness::TestServer;

use crate::support::{assert_still_serving, raw_connection};

/// Sends `bytes` on a fresh RPC stream and asserts the server closes the
/// connection within `within`.
async fn assert_closed_after(server: &TestServer, bytes: &[u8], within: Duration) {
    let (_ep, conn) = raw_connection(server).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    let reason = tokio::time::timeout(within, conn.closed())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "server kept a connection open after {} hostile bytes",
                bytes.len()
            )
        });
    assert!(
        matches!(reason, quinn::ConnectionError::ApplicationClosed(_)),
        "expected an application close, got {reason:?}"
    );
}

fn header(segment_count_minus_one: u32, first_size: u32) -> Vec<u8> {
    let mut h = segment_count_minus_one.to_le_bytes().to_vec();
    h.extend_from_slice(&first_size.to_le_bytes());
    h
}

#[tokio::test]
async fn garbage_bytes_close_the_connection() {
    let server = TestServer::start().unwrap();
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    assert_closed_after(&server, &garbage, Duration::from_secs(5)).await;
    assert_still_serving(&server).await;
}

#[tokio::test]
async fn a_huge_frame_is_refused_from_its_header_before_allocation() {
    let server = TestServer::start().unwrap();
    // One segment of 2^28 words (2 GiB): only the 8-byte header is ever sent.
    assert_closed_after(&server, &header(0, 1 << 28), Duration::from_secs(5)).await;
    assert_still_serving(&server).await;
}

#[tokio::test]
async fn bad_segment_counts_are_refused() {
    let server = TestServer::start().unwrap();
    assert_closed_after(&server, &header(600, 1), Duration::from_secs(5)).await;
    assert_closed_after(&server, &header(u32::MAX, 1), Duration::from_secs(5)).await;
    assert_still_serving(&server).await;
}

#[tokio::test]
async fn a_deeply_nested_message_is_an_error_not_a_crash() {
    let server = TestServer::start().unwrap();
    // A chain of 200 structs, each a pointer to the next: far past the nesting limit.
    let depth = 200u32;
    let mut frame = header(0, depth + 1);
    for _ in 0..depth {
        frame.extend_from_slice(&(1u64 << 48).to_le_bytes()); // struct ptr: 0 data words, 1 pointer, offset 0
    }
    frame.extend_from_slice(&0u64.to_le_bytes());
    let (_ep, conn) = raw_connection(&server).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&frame).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_still_serving(&server).await;
}

#[tokio::test]
async fn a_trickled_frame_is_cut_off_by_the_frame_deadline() {
    let server = TestServer::start_with(|c| c.limits.frame_timeout_secs = 1).unwrap();
    let (_ep, conn) = raw_connection(&server).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    // A frame announcing 4 words, of which only one byte ever comes; keep
    // sending nothing so QUIC's idle timeout (60 s) is not what closes it.
    let mut partial = header(0, 4);
    partial.push(0);
    send.write_all(&partial).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(4), conn.closed()).await;
    assert!(
        closed.is_ok(),
        "a stalled frame must be cut off within the deadline"
    );
    assert_still_serving(&server).await;
}

#[tokio::test]
async fn a_second_stream_is_not_granted() {
    let server = TestServer::start().unwrap();
    let (_ep, conn) = raw_connection(&server).await;
    let (mut s1, _r1) = conn.open_bi().await.unwrap();
    s1.write_all(&[0]).await.unwrap();
    let second = tokio::time::timeout(Duration::from_millis(500), conn.open_bi()).await;
    assert!(
        second.is_err(),
        "the server grants one bidirectional stream per connection"
    );
    assert_still_serving(&server).await;
}

#[tokio::test]
async fn an_rpc_message_the_server_does_not_implement_is_echoed_as_unimplemented() {
    use quicnprotochat_proto::capnp;
    use quicnprotochat_proto::capnp_rpc::rpc_capnp::message;

    let server = TestServer::start().unwrap();
    let (_ep, conn) = raw_connection(&server).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    // `Provide` is a level-3 RPC message (three-party handoff), which this
    // server does not implement.
    let mut out = capnp::message::Builder::new_default();
    {
        let mut provide = out.init_root::<message::Builder>().init_provide();
        provide.set_question_id(7);
        provide.init_target().set_imported_cap(0);
    }
    send.write_all(&capnp::serialize::write_message_to_words(&out))
        .await
        .unwrap();
    // The answer is an `Unimplemented` message carrying the original back.
    let mut buf: Vec<u8> = Vec::new();
    let reply = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let mut chunk = [0u8; 4096];
            match recv.read(&mut chunk).await.unwrap() {
                Some(n) => buf.extend_from_slice(&chunk[..n]),
                None => panic!("stream ended without an answer"),
            }
            let mut slice = buf.as_slice();
            if capnp::serialize::read_message_from_flat_slice(&mut slice, Default::default())
                .is_ok()
            {
                let mut whole = buf.as_slice();
                return capnp::serialize::read_message(&mut whole, Default::default()).unwrap();
            }
        }
    })
    .await
    .expect("an answer within 5 s");
    let root = reply.get_root::<message::Reader>().unwrap();
    match root.which().unwrap() {
        message::Unimplemented(echo) => {
            assert!(matches!(
                echo.unwrap().which().unwrap(),
                message::Provide(_)
            ));
        }
        _ => panic!("expected an Unimplemented message"),
    }
    // The connection stays open and the server keeps serving.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), conn.closed())
            .await
            .is_err(),
        "an unimplemented RPC message must not close the connection"
    );
    assert_still_serving(&server).await;
}
