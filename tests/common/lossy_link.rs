//! A loopback TCP link between a client and a real server that can lose a reply on its way
//! back, then go down and come back: the network fault behind "the command landed, its reply
//! never came" (a server killed right after it wrote its append-only file, a connection cut
//! mid-exchange), made deterministic.
//!
//! Everything the client sends reaches the server untouched; only what comes back is lost.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

/// What the link does with the bytes the server sends back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Both ways, untouched.
    Pass,
    /// The next bytes the server sends back are dropped, and the link goes down at once.
    LoseNextReply,
    /// Every connection is cut; new ones are accepted and closed at once.
    Down,
}

/// A link to `upstream`, listening on a loopback port of its own; it closes with the value.
pub struct LossyLink {
    address: SocketAddr,
    mode: Arc<watch::Sender<Mode>>,
    accept: JoinHandle<()>,
}

impl LossyLink {
    /// A link to the server on loopback port `upstream`.
    pub async fn to(upstream: u16) -> Self {
        // Port 0: bound at once, nothing can take it in between, and it is never restarted.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind the link's port");
        let address = listener.local_addr().expect("the link's address");
        let mode = Arc::new(watch::Sender::new(Mode::Pass));
        let accept = tokio::spawn({
            let mode = Arc::clone(&mode);
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    if *mode.borrow() == Mode::Down {
                        drop(client);
                        continue;
                    }
                    tokio::spawn(relay(client, upstream, Arc::clone(&mode)));
                }
            }
        });
        Self {
            address,
            mode,
            accept,
        }
    }

    /// `redis://` URL of the link.
    pub fn redis_url(&self) -> String {
        format!("redis://{}", self.address)
    }

    /// Loses the next reply the server sends back (the command it answers has landed), then
    /// stays down until [`up`](Self::up).
    pub fn lose_next_reply(&self) {
        self.mode.send_replace(Mode::LoseNextReply);
    }

    /// Whether the link is down (after a lost reply).
    pub fn is_down(&self) -> bool {
        *self.mode.borrow() == Mode::Down
    }

    /// Passes everything again; clients reconnect.
    pub fn up(&self) {
        self.mode.send_replace(Mode::Pass);
    }
}

impl Drop for LossyLink {
    fn drop(&mut self) {
        self.accept.abort();
        // Cuts the connections still open.
        self.mode.send_replace(Mode::Down);
    }
}

/// Relays one connection until either side closes it or the link goes down.
async fn relay(mut client: TcpStream, upstream: u16, mode: Arc<watch::Sender<Mode>>) {
    let Ok(mut server) = TcpStream::connect((Ipv4Addr::LOCALHOST, upstream)).await else {
        return;
    };
    let mut changes = mode.subscribe();
    let (mut to_server, mut to_client) = ([0u8; 16 * 1024], [0u8; 16 * 1024]);
    loop {
        tokio::select! {
            read = client.read(&mut to_server) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => if server.write_all(&to_server[..n]).await.is_err() { return },
            },
            read = server.read(&mut to_client) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if *mode.borrow() == Mode::LoseNextReply {
                        // Dropped, and every connection cut: the client never learns.
                        mode.send_replace(Mode::Down);
                        return;
                    }
                    if client.write_all(&to_client[..n]).await.is_err() {
                        return;
                    }
                }
            },
            changed = changes.changed() => {
                if changed.is_err() || *changes.borrow_and_update() == Mode::Down {
                    return;
                }
            }
        }
    }
}
