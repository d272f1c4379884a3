//! The agent: this test binary, run again inside a test's cgroup (and,
//! when asked, a network namespace), connecting and closing when told, so
//! that connections stay open while a test looks at the kernel.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::Duration,
};

/// Set in the agent's environment: the cgroup it joins.
const AGENT_CGROUP: &str = "RULEBPF_TEST_AGENT_CGROUP";
/// Set in the agent's environment: the network namespace it enters
/// (`/run/netns/NAME`), if any.
const AGENT_NETNS: &str = "RULEBPF_TEST_AGENT_NETNS";
/// How long a TCP connect may take: a firewall that drops the SYN makes
/// it time out (errno 110).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Not a test: the body of an [`Agent`] (returns at once in a normal run).
#[test]
fn agent() {
    if let Some(cgroup) = std::env::var_os(AGENT_CGROUP) {
        agent_main(
            Path::new(&cgroup),
            std::env::var_os(AGENT_NETNS).as_deref().map(Path::new),
        );
    }
}

/// A process in a test cgroup that connects when told and keeps its
/// sockets until told otherwise; one command per line on its stdin, one
/// `agent: ...` line per answer.
pub struct Agent {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Agent {
    pub fn start(cgroup: &Path) -> Self {
        Self::start_in(cgroup, None)
    }

    /// An agent in `cgroup` and in the network namespace `netns`
    /// (`/run/netns/NAME`).
    pub fn start_in(cgroup: &Path, netns: Option<&Path>) -> Self {
        let mut command = Command::new(std::env::current_exe().unwrap());
        if let Some(netns) = netns {
            command.env(AGENT_NETNS, netns);
        }
        let mut child = command
            .args(["agent::agent", "--exact", "--nocapture", "--test-threads=1"])
            .env(AGENT_CGROUP, cgroup)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut agent = Self {
            stdin: child.stdin.take().unwrap(),
            stdout: BufReader::new(child.stdout.take().unwrap()),
            child,
        };
        assert_eq!(agent.ask("ready"), "ready");
        agent
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a command; returns the answer without its `agent: ` prefix.
    fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        loop {
            let mut line = String::new();
            assert!(
                self.stdout.read_line(&mut line).unwrap() > 0,
                "the agent ended at `{command}`"
            );
            // libtest may have begun the line (`test sharing::agent ... `).
            if let Some((_, answer)) = line.trim_end().split_once("agent: ") {
                return answer.to_string();
            }
        }
    }

    /// `ok ID PORT` as `Ok((id, port))`, `err ERRNO` as `Err(errno)`.
    fn opened(&mut self, command: &str) -> Result<(usize, u16), i32> {
        let answer = self.ask(command);
        let words: Vec<&str> = answer.split(' ').collect();
        match words[..] {
            ["ok", id, port] => Ok((id.parse().unwrap(), port.parse().unwrap())),
            ["err", errno] => Err(errno.parse().unwrap()),
            _ => panic!("`{command}`: {answer}"),
        }
    }

    /// A TCP connection to `dest`, kept open: its id and origin port.
    pub fn tcp(&mut self, dest: SocketAddr) -> Result<(usize, u16), i32> {
        self.opened(&format!("tcp {dest}"))
    }

    /// A connected UDP socket to `dest` that sent one datagram.
    pub fn udp(&mut self, dest: SocketAddr) -> Result<(usize, u16), i32> {
        self.opened(&format!("udp {dest}"))
    }

    /// connect() the UDP socket `id` again, to `dest`.
    pub fn reconnect(&mut self, id: usize, dest: SocketAddr) -> Result<u16, i32> {
        self.opened(&format!("reconnect {id} {dest}"))
            .map(|(_, port)| port)
    }

    /// Closes socket `id` (the client closes first).
    pub fn close(&mut self, id: usize) {
        assert_eq!(self.ask(&format!("close {id}")), "ok");
    }

    /// Resets TCP socket `id` (no TIME_WAIT on either side).
    pub fn reset(&mut self, id: usize) {
        assert_eq!(self.ask(&format!("reset {id}")), "ok");
    }

    /// Sends a datagram on UDP socket `id`.
    pub fn send(&mut self, id: usize) {
        assert_eq!(self.ask(&format!("send {id}")), "ok");
    }

    /// The next datagram on UDP socket `id` (2 s at most), or the errno.
    pub fn recv(&mut self, id: usize) -> Result<String, i32> {
        let answer = self.ask(&format!("recv {id}"));
        match answer.split_once(' ') {
            Some(("ok", text)) => Ok(text.to_string()),
            Some(("err", errno)) => Err(errno.parse().unwrap()),
            _ => panic!("recv: {answer}"),
        }
    }

    /// `n` TCP connections to `dest`, each closed by the client first right
    /// after connect() (then by the server): the failures and the origin
    /// ports used.
    pub fn churn(&mut self, dest: SocketAddr, n: u32) -> (Vec<i32>, BTreeSet<u16>) {
        let answer = self.ask(&format!("churn {dest} {n}"));
        let (errors, ports) = answer
            .strip_prefix("ok ")
            .and_then(|rest| rest.split_once(';'))
            .unwrap_or_else(|| panic!("churn: {answer}"));
        let numbers = |s: &str| -> Vec<i64> {
            s.split(',')
                .filter(|w| !w.is_empty())
                .map(|w| w.parse().unwrap())
                .collect()
        };
        (
            numbers(errors).into_iter().map(|e| e as i32).collect(),
            numbers(ports).into_iter().map(|p| p as u16).collect(),
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "exit");
        let _ = self.child.wait();
    }
}

/// The agent's side: joins the cgroup, then serves commands.
fn agent_main(cgroup: &Path, netns: Option<&Path>) {
    fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string()).unwrap();
    if let Some(netns) = netns {
        // After the cgroup: entering a network namespace changes no mount,
        // so /sys/fs/cgroup stays the host's either way.
        let file = fs::File::open(netns).unwrap();
        // SAFETY: setns on a namespace file we opened; the agent has one
        // thread.
        let entered = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "setns {}", netns.display());
    }
    enum Sock {
        Tcp(TcpStream),
        Udp(UdpSocket),
    }
    let mut socks: Vec<Option<Sock>> = Vec::new();
    let errno = |e: std::io::Error| format!("err {}", e.raw_os_error().unwrap_or(0));
    let port = |a: std::io::Result<SocketAddr>| a.map_or(0, |a| a.port());
    for line in std::io::stdin().lines() {
        let line = line.unwrap();
        let words: Vec<&str> = line.split(' ').collect();
        let answer = match words[..] {
            ["ready"] => "ready".to_string(),
            ["exit"] => break,
            ["tcp", dest] => match TcpStream::connect_timeout(
                &dest.parse::<SocketAddr>().unwrap(),
                CONNECT_TIMEOUT,
            ) {
                Ok(s) => {
                    let p = port(s.local_addr());
                    socks.push(Some(Sock::Tcp(s)));
                    format!("ok {} {p}", socks.len() - 1)
                }
                Err(e) => errno(e),
            },
            ["udp", dest] => match udp_connect(dest.parse().unwrap()) {
                Ok(s) => {
                    let p = port(s.local_addr());
                    socks.push(Some(Sock::Udp(s)));
                    format!("ok {} {p}", socks.len() - 1)
                }
                Err(e) => errno(e),
            },
            ["reconnect", id, dest] => {
                let Some(Sock::Udp(s)) = &socks[id.parse::<usize>().unwrap()] else {
                    panic!("reconnect: {id} is no UDP socket")
                };
                match s.connect(dest.parse::<SocketAddr>().unwrap()) {
                    Ok(()) => format!("ok {id} {}", port(s.local_addr())),
                    Err(e) => errno(e),
                }
            }
            ["close", id] => {
                socks[id.parse::<usize>().unwrap()] = None;
                "ok".to_string()
            }
            ["reset", id] => {
                // SO_LINGER 0: closed with a RST, so no TIME_WAIT keeps the
                // port from a test run again within a minute.
                if let Some(Sock::Tcp(s)) = socks[id.parse::<usize>().unwrap()].take() {
                    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                }
                "ok".to_string()
            }
            ["send", id] => {
                let Some(Sock::Udp(s)) = &socks[id.parse::<usize>().unwrap()] else {
                    panic!("send: {id} is no UDP socket")
                };
                let _ = s.send(b"again");
                "ok".to_string()
            }
            ["recv", id] => {
                let Some(Sock::Udp(s)) = &socks[id.parse::<usize>().unwrap()] else {
                    panic!("recv: {id} is no UDP socket")
                };
                let mut buf = [0u8; 64];
                match s.recv(&mut buf) {
                    Ok(n) => format!("ok {}", String::from_utf8_lossy(&buf[..n])),
                    Err(e) => errno(e),
                }
            }
            ["churn", dest, n] => {
                let dest: SocketAddr = dest.parse().unwrap();
                let (mut errors, mut ports) = (Vec::new(), BTreeSet::new());
                for _ in 0..n.parse::<u32>().unwrap() {
                    match TcpStream::connect(dest) {
                        Ok(mut s) => {
                            ports.insert(port(s.local_addr()));
                            // The client closes first (its FIN first: TIME_WAIT
                            // lands here), then waits for the server's FIN.
                            let _ = s.shutdown(std::net::Shutdown::Write);
                            let _ = std::io::Read::read(&mut s, &mut [0u8; 1]);
                        }
                        Err(e) => errors.push(e.raw_os_error().unwrap_or(0)),
                    }
                }
                let list = |v: Vec<String>| v.join(",");
                format!(
                    "ok {};{}",
                    list(errors.iter().map(i32::to_string).collect()),
                    list(ports.iter().map(u16::to_string).collect())
                )
            }
            _ => panic!("agent: unknown command `{line}`"),
        };
        println!("agent: {answer}");
    }
}

/// A UDP socket connected to `dest` (not bound first: the hook binds it)
/// that sent one datagram, so that the peer learns its address.
fn udp_connect(dest: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(dest),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.connect(&dest.into())?;
    let socket: UdpSocket = socket.into();
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    socket.send(b"hello")?;
    Ok(socket)
}
