//! The outbound side of the Raft port: one task per peer dials it, proves who it reached,
//! sends its hello and then the queued messages, batching what is queued into one flush, and
//! reports the connection's fate (connected, unreachable, closed, gone).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::SinkExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedWrite, LengthDelimitedCodec};

use super::{
    encode, hello_frame, is_snapshot, Event, Io, Security, Shared, BACKOFF_MAX, BACKOFF_MIN, CONNECT_TIMEOUT,
    HANDSHAKE_TIMEOUT, KEEPALIVE, KIND_KEEPALIVE,
};
use crate::node::Outbound;
use crate::tls::{identity_of, server_name};

/// How `connect` starts its error when the peer's host refused the connection.
const REFUSED: &str = "connection refused";

/// Whether an I/O error means the peer's host closed or reset the connection.
fn closed_by_host(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof)
}

/// Connects to peer `id` and proves it is that node.
pub(super) async fn connect(id: u64, addr: SocketAddr, security: &Security) -> Result<Box<dyn Io>, String> {
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Err(format!("{REFUSED}: {e}")),
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("connect timed out".into()),
    };
    // Without it a message may wait for Nagle's algorithm; the link still works.
    let _ = stream.set_nodelay(true);
    match security {
        Security::Plain => Ok(Box::new(stream)),
        Security::Tls(tls) => {
            let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
            let name = server_name(&tls.me.cluster, id);
            let s = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(format!("TLS handshake failed: {e}")),
                Err(_) => return Err("TLS handshake timed out".into()),
            };
            let certs = s.get_ref().1.peer_certificates().unwrap_or_default();
            let who = identity_of(certs.first().ok_or("no server certificate")?).map_err(|e| e.to_string())?;
            if who.node != id || who.cluster != tls.me.cluster {
                return Err(format!("the certificate names node {} of cluster \"{}\"", who.node, who.cluster));
            }
            Ok(Box::new(s))
        }
    }
}

pub(super) async fn peer_writer(
    id: u64,
    addr: SocketAddr,
    me: SocketAddr,
    mut rx: mpsc::Receiver<Outbound>,
    shared: Arc<Shared>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let io = match connect(id, addr, &shared.security).await {
            Ok(io) => io,
            Err(reason) => {
                if reason.starts_with("TLS") || reason.starts_with("the certificate") {
                    shared.refuse(addr, || format!("node {id}: {reason}"));
                }
                if reason.starts_with(REFUSED) {
                    shared.emit(Event::Gone { peer: id }, None);
                }
                // Messages queued for an unreachable peer are stale by the time it is back.
                let mut snapshot_failed = false;
                loop {
                    match rx.try_recv() {
                        Ok(m) => snapshot_failed |= is_snapshot(&m),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => return,
                    }
                }
                shared.emit(Event::Unreachable { peer: id, snapshot_failed }, None);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                if rx.is_closed() {
                    return;
                }
                continue;
            }
        };
        let connected_at = tokio::time::Instant::now();
        shared.emit(Event::Connected { peer: id, addr }, None);
        // The peer never writes on this connection: reading tells at once when it closes it
        // (it restarted, or refused us), instead of at the next message, which would be lost.
        let (mut closed, wr) = tokio::io::split(io);
        let mut sink = FramedWrite::new(wr, shared.codec());
        // The hello goes out at once: the peer allows only HANDSHAKE_TIMEOUT for it.
        let hello = hello_frame(shared.me, shared.cluster_id(), me);
        let mut greeting = sink.send(hello).await.err();
        let mut scratch = [0u8; 256];
        let error = loop {
            if let Some(e) = greeting.take() {
                break e.to_string();
            }
            let first = tokio::select! {
                next = tokio::time::timeout(KEEPALIVE, rx.recv()) => match next {
                    Ok(Some(m)) => Some(m),
                    Ok(None) => return,
                    Err(_) => None,
                },
                read = tokio::io::AsyncReadExt::read(&mut closed, &mut scratch) => match read {
                    Ok(0) => {
                        shared.emit(Event::Gone { peer: id }, None);
                        break "closed by the peer".to_string();
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        if closed_by_host(&e) {
                            shared.emit(Event::Gone { peer: id }, None);
                        }
                        break e.to_string();
                    }
                },
            };
            let mut snapshot = first.as_ref().is_some_and(is_snapshot);
            let mut res = match &first {
                None => sink.feed(Bytes::from_static(&[KIND_KEEPALIVE])).await,
                Some(m) => feed(&mut sink, m, &shared).await,
            };
            // Batch whatever else is queued into the same flush.
            while res.is_ok() {
                match rx.try_recv() {
                    Ok(m) => {
                        snapshot |= is_snapshot(&m);
                        res = feed(&mut sink, &m, &shared).await;
                    }
                    Err(_) => break,
                }
            }
            if res.is_ok() {
                res = SinkExt::<Bytes>::flush(&mut sink).await;
            }
            if let Err(e) = res {
                if closed_by_host(&e) {
                    shared.emit(Event::Gone { peer: id }, None);
                }
                shared.emit(Event::Unreachable { peer: id, snapshot_failed: snapshot }, None);
                break e.to_string();
            }
        };
        shared.emit(Event::Disconnected { peer: id, addr, error }, None);
        // A connection that dies at once (say, a proxy that accepts and then resets) must not
        // turn into a reconnect loop: back off unless it had lived a while.
        if connected_at.elapsed() >= Duration::from_secs(1) {
            backoff = BACKOFF_MIN;
        } else {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

/// Queues one message on the connection; one that cannot be encoded is reported and skipped.
async fn feed(
    sink: &mut FramedWrite<tokio::io::WriteHalf<Box<dyn Io>>, LengthDelimitedCodec>,
    m: &Outbound,
    shared: &Shared,
) -> Result<(), std::io::Error> {
    match encode(m) {
        Ok(b) => sink.feed(b).await,
        Err(error) => {
            shared.emit(Event::Unsendable { peer: m.to(), error }, None);
            Ok(())
        }
    }
}
