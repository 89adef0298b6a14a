//! The cluster's own Erlang port mapper, with a relay in front of each
//! node's distribution port, so a test can cut one node off from the others
//! (a network partition) while the test and `rabbitmqctl` still reach it.
//!
//! Every node and every command-line tool of the cluster runs with
//! `ERL_EPMD_PORT` pointing here instead of at the machine's epmd (which
//! keeps serving the system broker, untouched). A node registers its real
//! distribution port (`ALIVE2_REQ`); whoever asks where a cluster node
//! listens (`PORT2_REQ`) is given the port of that node's relay. The relay
//! reads the first message of each distribution handshake, which names the
//! connecting node, and refuses (or cuts) the connections between an
//! isolated node and the other cluster nodes. Connections from anything else
//! (the command-line tools) always pass.
//!
//! The protocol is the one in the ERTS documentation ("Distribution
//! Protocol"): requests are a 2-byte length and a tagged body, replies are
//! untagged by length. Everything here runs on plain threads, so it keeps
//! working whatever the test's async runtime is doing.

use std::collections::{HashMap, HashSet};
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

const ALIVE2_REQ: u8 = b'x';
const ALIVE2_X_RESP: u8 = b'v';
const PORT_PLEASE2_REQ: u8 = b'z';
const PORT2_RESP: u8 = b'w';
const NAMES_REQ: u8 = b'n';

/// How long a peer may take to send its request or its first handshake
/// message before the connection is dropped.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// The port mapper and the relays; dropping it stops them and cuts every
/// relayed connection.
#[derive(Debug)]
pub(super) struct PortMapper {
    port: u16,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    stopping: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    /// Registered nodes by short name (the part before `@`).
    registered: HashMap<String, Registration>,
    /// The relay port of each cluster node, by short name.
    relays: HashMap<String, u16>,
    isolated: HashSet<String>,
    links: Vec<Link>,
    next_id: u64,
    /// Every port this mapper listens on, to wake the acceptors at the end.
    listening: Vec<u16>,
}

#[derive(Debug)]
struct Registration {
    /// Which `ALIVE2` connection holds it (the node is registered while that
    /// connection stays open).
    id: u64,
    port: u16,
    node_type: u8,
    protocol: u8,
    highest_version: u16,
    lowest_version: u16,
    extra: Vec<u8>,
}

/// A relayed distribution connection.
#[derive(Debug)]
struct Link {
    id: u64,
    from: Option<String>,
    to: String,
    streams: [TcpStream; 2],
}

impl Link {
    fn cut(&self) {
        for stream in &self.streams {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

impl State {
    /// Whether a connection from `from` (a node name, when the handshake
    /// named one) to the cluster node `to` may pass.
    fn allows(&self, from: Option<&str>, to: &str) -> bool {
        let Some(from) = from else { return true };
        if !self.relays.contains_key(from) {
            return true;
        }
        !self.isolated.contains(from) && !self.isolated.contains(to)
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl PortMapper {
    /// Listens on a free local port.
    pub(super) fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared::default());
        shared.state().listening.push(port);
        let acceptor = shared.clone();
        std::thread::Builder::new()
            .name(format!("epmd-{port}"))
            .spawn(move || accept(&listener, &acceptor, serve_request))?;
        Ok(Self { port, shared })
    }

    /// The port to put in `ERL_EPMD_PORT`.
    pub(super) fn port(&self) -> u16 {
        self.port
    }

    /// Starts the relay for cluster node `short_name` and returns its port,
    /// which is what the mapper answers for that node from now on.
    pub(super) fn add_relay(&self, short_name: &str) -> std::io::Result<u16> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        {
            let mut state = self.shared.state();
            state.relays.insert(short_name.to_owned(), port);
            state.listening.push(port);
        }
        let shared = self.shared.clone();
        let to = short_name.to_owned();
        std::thread::Builder::new()
            .name(format!("relay-{port}"))
            .spawn(move || {
                accept(&listener, &shared, move |shared, stream| {
                    relay(shared, &to, stream)
                })
            })?;
        Ok(port)
    }

    /// Cuts every connection between cluster node `short_name` and the
    /// other cluster nodes, and refuses new ones until [`PortMapper::heal`].
    pub(super) fn isolate(&self, short_name: &str) {
        let mut state = self.shared.state();
        state.isolated.insert(short_name.to_owned());
        let (cut, kept): (Vec<Link>, Vec<Link>) =
            std::mem::take(&mut state.links).into_iter().partition(|link| {
                let between_nodes = link
                    .from
                    .as_deref()
                    .is_some_and(|from| state.relays.contains_key(from));
                between_nodes && (link.to == short_name || link.from.as_deref() == Some(short_name))
            });
        state.links = kept;
        drop(state);
        for link in cut {
            link.cut();
        }
    }

    /// Lets cluster node `short_name` reach the others again.
    pub(super) fn heal(&self, short_name: &str) {
        self.shared.state().isolated.remove(short_name);
    }

    /// Whether a node named `short_name` is registered (its VM is up with
    /// distribution started).
    pub(super) fn is_registered(&self, short_name: &str) -> bool {
        self.shared.state().registered.contains_key(short_name)
    }
}

impl Drop for PortMapper {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let (links, listening) = {
            let mut state = self.shared.state();
            (std::mem::take(&mut state.links), state.listening.clone())
        };
        for link in links {
            link.cut();
        }
        // Each acceptor is blocked in accept(); one connection wakes it to
        // see the flag.
        for port in listening {
            let _ = TcpStream::connect_timeout(
                &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                Duration::from_secs(1),
            );
        }
    }
}

/// Serves each connection to `listener` on its own thread until the mapper
/// is dropped.
fn accept<F>(listener: &TcpListener, shared: &Arc<Shared>, serve: F)
where
    F: Fn(&Shared, TcpStream) -> std::io::Result<()> + Clone + Send + 'static,
{
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else {
            // Out of file descriptors, say: let some close.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let (shared, serve) = (shared.clone(), serve.clone());
        let _ = std::thread::Builder::new()
            .name("epmd-connection".to_owned())
            .spawn(move || {
                let _ = serve(&shared, stream);
            });
    }
}

/// Reads one length-prefixed message: a request to the mapper, or the first
/// message of a distribution handshake.
fn read_message(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut length = [0_u8; 2];
    stream.read_exact(&mut length)?;
    let mut body = vec![0_u8; usize::from(u16::from_be_bytes(length))];
    stream.read_exact(&mut body)?;
    Ok(body)
}

fn serve_request(shared: &Shared, mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(REQUEST_DEADLINE))?;
    let request = read_message(&mut stream)?;
    let Some((&tag, body)) = request.split_first() else {
        return Ok(());
    };
    match tag {
        ALIVE2_REQ => register(shared, stream, body),
        PORT_PLEASE2_REQ => {
            let name = String::from_utf8_lossy(body);
            let reply = port_reply(&shared.state(), &name);
            stream.write_all(&reply)
        }
        NAMES_REQ => {
            let mut reply = u32::from(stream.local_addr()?.port()).to_be_bytes().to_vec();
            for (name, registration) in &shared.state().registered {
                reply.extend_from_slice(format!("name {name} at port {}\n", registration.port).as_bytes());
            }
            stream.write_all(&reply)
        }
        // Dumps, kills and stops are not for tests to send.
        _ => Ok(()),
    }
}

/// `ALIVE2_REQ`: registers the node for as long as this connection stays
/// open, as epmd does.
fn register(shared: &Shared, mut stream: TcpStream, body: &[u8]) -> std::io::Result<()> {
    let Some((name, registration)) = parse_alive2(body) else {
        return Ok(());
    };
    let id = {
        let mut state = shared.state();
        if state.registered.contains_key(&name) {
            drop(state);
            return stream.write_all(&[ALIVE2_X_RESP, 1, 0, 0, 0, 0]);
        }
        state.next_id += 1;
        let id = state.next_id;
        state
            .registered
            .insert(name.clone(), Registration { id, ..registration });
        id
    };
    // The creation tells incarnations of a node apart; any non-zero value
    // new to this name will do.
    let creation = u32::try_from(id % u64::from(u32::MAX)).unwrap_or(1).max(1);
    let mut reply = vec![ALIVE2_X_RESP, 0];
    reply.extend_from_slice(&creation.to_be_bytes());
    let written = stream.write_all(&reply);
    if written.is_ok() {
        let _ = stream.set_read_timeout(None);
        let mut sink = [0_u8; 64];
        while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
    }
    let mut state = shared.state();
    if state.registered.get(&name).is_some_and(|r| r.id == id) {
        state.registered.remove(&name);
    }
    written
}

fn parse_alive2(body: &[u8]) -> Option<(String, Registration)> {
    let u16_at = |at: usize| Some(u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]));
    let port = u16_at(0)?;
    let node_type = *body.get(2)?;
    let protocol = *body.get(3)?;
    let highest_version = u16_at(4)?;
    let lowest_version = u16_at(6)?;
    let name_length = usize::from(u16_at(8)?);
    let name = body.get(10..10 + name_length)?;
    let extra_at = 10 + name_length;
    let extra_length = usize::from(u16_at(extra_at)?);
    let extra = body.get(extra_at + 2..extra_at + 2 + extra_length)?.to_vec();
    let registration = Registration {
        id: 0,
        port,
        node_type,
        protocol,
        highest_version,
        lowest_version,
        extra,
    };
    Some((String::from_utf8_lossy(name).into_owned(), registration))
}

/// `PORT2_RESP` for `name`: the relay's port for a cluster node, the real
/// one for anything else (command-line tools).
fn port_reply(state: &State, name: &str) -> Vec<u8> {
    let Some(registration) = state.registered.get(name) else {
        return vec![PORT2_RESP, 1];
    };
    let port = state.relays.get(name).copied().unwrap_or(registration.port);
    let mut reply = vec![PORT2_RESP, 0];
    reply.extend_from_slice(&port.to_be_bytes());
    reply.push(registration.node_type);
    reply.push(registration.protocol);
    reply.extend_from_slice(&registration.highest_version.to_be_bytes());
    reply.extend_from_slice(&registration.lowest_version.to_be_bytes());
    let name_length = u16::try_from(name.len()).unwrap_or(u16::MAX);
    reply.extend_from_slice(&name_length.to_be_bytes());
    reply.extend_from_slice(name.as_bytes());
    let extra_length = u16::try_from(registration.extra.len()).unwrap_or(u16::MAX);
    reply.extend_from_slice(&extra_length.to_be_bytes());
    reply.extend_from_slice(&registration.extra);
    reply
}

/// The node named in the first message of a distribution handshake
/// (`send_name`: tag `n` in the old format, `N` since OTP 23).
fn handshake_name(message: &[u8]) -> Option<&str> {
    let name = match message.first()? {
        b'n' => message.get(7..)?,
        b'N' => {
            let length = usize::from(u16::from_be_bytes([*message.get(13)?, *message.get(14)?]));
            message.get(15..15 + length)?
        }
        _ => return None,
    };
    std::str::from_utf8(name).ok()
}

/// `node@host` → `node`.
pub(super) fn short_name(node: &str) -> &str {
    node.split_once('@').map_or(node, |(short, _)| short)
}

/// Forwards one distribution connection to cluster node `to`, unless the
/// partition forbids it.
fn relay(shared: &Shared, to: &str, mut client: TcpStream) -> std::io::Result<()> {
    client.set_read_timeout(Some(REQUEST_DEADLINE))?;
    let first = read_message(&mut client)?;
    let from = handshake_name(&first).map(|node| short_name(node).to_owned());
    let Some(port) = ({
        let state = shared.state();
        let port = state.registered.get(to).map(|r| r.port);
        port.filter(|_| state.allows(from.as_deref(), to))
    }) else {
        // Not there, or cut off: the peer sees the connection closed, as
        // when a network drops it.
        return Ok(());
    };
    let mut upstream =
        TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), REQUEST_DEADLINE)?;
    client.set_read_timeout(None)?;
    client.set_nodelay(true)?;
    upstream.set_nodelay(true)?;
    let length = u16::try_from(first.len()).unwrap_or(u16::MAX);
    upstream.write_all(&length.to_be_bytes())?;
    upstream.write_all(&first)?;

    let id = {
        let mut state = shared.state();
        // The partition may have started while this connection was set up.
        if !state.allows(from.as_deref(), to) {
            return Ok(());
        }
        state.next_id += 1;
        let id = state.next_id;
        state.links.push(Link {
            id,
            from: from.clone(),
            to: to.to_owned(),
            streams: [client.try_clone()?, upstream.try_clone()?],
        });
        id
    };
    let (mut client_reader, mut upstream_writer) = (client.try_clone()?, upstream.try_clone()?);
    let forward = std::thread::Builder::new()
        .name("relay-forward".to_owned())
        .spawn(move || {
            let _ = std::io::copy(&mut client_reader, &mut upstream_writer);
            let _ = upstream_writer.shutdown(Shutdown::Both);
            let _ = client_reader.shutdown(Shutdown::Both);
        })?;
    let _ = std::io::copy(&mut upstream, &mut client);
    let _ = client.shutdown(Shutdown::Both);
    let _ = upstream.shutdown(Shutdown::Both);
    let _ = forward.join();
    shared.state().links.retain(|link| link.id != id);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(port: u16, body: &[u8]) -> TcpStream {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let length = u16::try_from(body.len()).unwrap();
        stream.write_all(&length.to_be_bytes()).unwrap();
        stream.write_all(body).unwrap();
        stream
    }

    fn alive2(name: &str, port: u16) -> Vec<u8> {
        let mut body = vec![ALIVE2_REQ];
        body.extend_from_slice(&port.to_be_bytes());
        body.extend_from_slice(&[77, 0, 0, 6, 0, 5]);
        body.extend_from_slice(&u16::try_from(name.len()).unwrap().to_be_bytes());
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(&[0, 0]);
        body
    }

    /// Registers `name` at `port`; the registration lasts as long as the
    /// returned connection.
    fn register(mapper: &PortMapper, name: &str, port: u16) -> TcpStream {
        let mut stream = request(mapper.port(), &alive2(name, port));
        let mut reply = [0_u8; 6];
        stream.read_exact(&mut reply).unwrap();
        assert_eq!(reply[..2], [ALIVE2_X_RESP, 0]);
        stream
    }

    fn port_of(mapper: &PortMapper, name: &str) -> Option<u16> {
        let mut body = vec![PORT_PLEASE2_REQ];
        body.extend_from_slice(name.as_bytes());
        let mut stream = request(mapper.port(), &body);
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).unwrap();
        assert_eq!(reply[0], PORT2_RESP);
        (reply[1] == 0).then(|| u16::from_be_bytes([reply[2], reply[3]]))
    }

    /// The `N` handshake message of node `name`.
    fn send_name(name: &str) -> Vec<u8> {
        let mut message = vec![b'N'];
        message.extend_from_slice(&[0; 12]);
        message.extend_from_slice(&u16::try_from(name.len()).unwrap().to_be_bytes());
        message.extend_from_slice(name.as_bytes());
        message
    }

    /// The next connection to `listener`, if one comes within a second.
    fn accept_soon(listener: &TcpListener) -> Option<TcpStream> {
        listener.set_nonblocking(true).unwrap();
        let until = std::time::Instant::now() + Duration::from_secs(1);
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).unwrap();
                    return Some(stream);
                }
                Err(_) if std::time::Instant::now() < until => std::thread::sleep(Duration::from_millis(10)),
                Err(_) => return None,
            }
        }
    }

    /// Whether a connection from node `from` through the relay on
    /// `relay_port` reaches `upstream` and carries bytes both ways.
    fn passes(relay_port: u16, from: &str, upstream: &TcpListener) -> bool {
        let mut client = request(relay_port, &send_name(from));
        let Some(mut server) = accept_soon(upstream) else {
            return false;
        };
        server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut first = vec![0_u8; 2 + send_name(from).len()];
        server.read_exact(&mut first).unwrap();
        server.write_all(b"ok").unwrap();
        let mut answer = [0_u8; 2];
        client.read_exact(&mut answer).unwrap();
        &answer == b"ok"
    }

    #[test]
    fn a_registered_node_is_found_at_its_port_until_its_connection_closes() {
        let mapper = PortMapper::start().unwrap();
        let registration = register(&mapper, "tool", 4321);
        assert_eq!(port_of(&mapper, "tool"), Some(4321));
        assert!(mapper.is_registered("tool"));
        drop(registration);
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while mapper.is_registered("tool") && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(port_of(&mapper, "tool"), None);
    }

    #[test]
    fn a_name_cannot_be_registered_twice() {
        let mapper = PortMapper::start().unwrap();
        let _first = register(&mapper, "node", 1000);
        let mut second = request(mapper.port(), &alive2("node", 1001));
        let mut reply = [0_u8; 6];
        second.read_exact(&mut reply).unwrap();
        assert_eq!(reply[..2], [ALIVE2_X_RESP, 1]);
    }

    #[test]
    fn names_lists_every_registered_node() {
        let mapper = PortMapper::start().unwrap();
        let _a = register(&mapper, "a", 1000);
        let _b = register(&mapper, "b", 2000);
        let mut stream = request(mapper.port(), &[NAMES_REQ]);
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).unwrap();
        let text = String::from_utf8_lossy(&reply[4..]).into_owned();
        assert!(text.contains("name a at port 1000\n"), "{text}");
        assert!(text.contains("name b at port 2000\n"), "{text}");
    }

    #[test]
    fn a_cluster_node_is_reached_through_its_relay_and_an_isolated_one_is_not() {
        let mapper = PortMapper::start().unwrap();
        let node_a = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let a_port = node_a.local_addr().unwrap().port();
        let relay_a = mapper.add_relay("a").unwrap();
        let _relay_b = mapper.add_relay("b").unwrap();
        let _registration = register(&mapper, "a", a_port);

        assert_eq!(port_of(&mapper, "a"), Some(relay_a));
        assert!(passes(relay_a, "b@localhost", &node_a));
        assert!(passes(relay_a, "rabbitmqcli-1@localhost", &node_a));

        mapper.isolate("b");
        assert!(!passes(relay_a, "b@localhost", &node_a));
        assert!(passes(relay_a, "rabbitmqcli-2@localhost", &node_a));

        mapper.heal("b");
        assert!(passes(relay_a, "b@localhost", &node_a));
    }

    #[test]
    fn isolating_a_node_cuts_its_live_connections() {
        let mapper = PortMapper::start().unwrap();
        let node_a = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let relay_a = mapper.add_relay("a").unwrap();
        let _relay_b = mapper.add_relay("b").unwrap();
        let _registration = register(&mapper, "a", node_a.local_addr().unwrap().port());
        let mut client = request(relay_a, &send_name("b@localhost"));
        let _server = accept_soon(&node_a).unwrap();

        mapper.isolate("a");

        let mut buffer = [0_u8; 1];
        assert!(matches!(client.read(&mut buffer), Ok(0) | Err(_)));
    }

    #[test]
    fn the_handshake_names_its_node_in_both_formats() {
        assert_eq!(handshake_name(&send_name("a@localhost")), Some("a@localhost"));
        let mut old = vec![b'n', 0, 5, 0, 0, 0, 0];
        old.extend_from_slice(b"b@localhost");
        assert_eq!(handshake_name(&old), Some("b@localhost"));
        assert_eq!(handshake_name(b"x"), None);
        assert_eq!(short_name("b@localhost"), "b");
    }
}
