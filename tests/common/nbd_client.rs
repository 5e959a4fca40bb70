//! A small blocking NBD client (fixed newstyle, NBD_OPT_GO, simple replies)
//! for tests that must know exactly which requests were acknowledged, and
//! for sending deliberately malformed traffic.

use std::io::{Read, Write};
use std::net::TcpStream;

pub const NBDMAGIC: u64 = 0x4e42444d41474943;
pub const IHAVEOPT: u64 = 0x49484156454F5054;

pub struct Client {
    pub s: TcpStream,
    pub size: u64,
    pub flags: u16,
    next: u64,
}

impl Client {
    pub fn connect(addr: &str, export: &str) -> std::io::Result<Client> {
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let mut g = [0u8; 18];
        s.read_exact(&mut g)?;
        assert_eq!(u64::from_be_bytes(g[0..8].try_into().unwrap()), NBDMAGIC);
        s.write_all(&3u32.to_be_bytes())?; // fixed newstyle + no zeroes
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        send_option(&mut s, 7, &d)?;
        let mut size = 0;
        let mut flags = 0;
        loop {
            let (typ, data) = read_option_reply(&mut s)?;
            match typ {
                1 => break,
                3 if data.len() >= 12 && data[0..2] == [0, 0] => {
                    size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    flags = u16::from_be_bytes(data[10..12].try_into().unwrap());
                }
                3 => {}
                t => {
                    return Err(std::io::Error::other(format!("GO refused: {t:#x} {}", String::from_utf8_lossy(&data))));
                }
            }
        }
        Ok(Client { s, size, flags, next: 1 })
    }

    fn request(&mut self, kind: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> std::io::Result<u64> {
        let h = self.next;
        self.next += 1;
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&0x25609513u32.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&h.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.s.write_all(&b)?;
        Ok(h)
    }

    /// Reads one simple reply; returns (handle, error).
    pub fn reply(&mut self) -> std::io::Result<(u64, u32)> {
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r)?;
        assert_eq!(u32::from_be_bytes(r[0..4].try_into().unwrap()), 0x67446698, "simple reply magic");
        Ok((u64::from_be_bytes(r[8..16].try_into().unwrap()), u32::from_be_bytes(r[4..8].try_into().unwrap())))
    }

    fn expect_ok(&mut self, h: u64) -> std::io::Result<()> {
        let (rh, err) = self.reply()?;
        assert_eq!(rh, h);
        if err != 0 {
            return Err(std::io::Error::other(format!("NBD error {err}")));
        }
        Ok(())
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
        let h = self.request(1, if fua { 1 } else { 0 }, offset, data.len() as u32, data)?;
        self.expect_ok(h)
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        let h = self.request(3, 0, 0, 0, &[])?;
        self.expect_ok(h)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        let h = self.request(0, 0, offset, len, &[])?;
        let (rh, err) = self.reply()?;
        assert_eq!(rh, h);
        if err != 0 {
            return Err(std::io::Error::other(format!("NBD error {err}")));
        }
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d)?;
        Ok(d)
    }

    /// Sends a raw request header (for malformed-input tests); returns the handle.
    pub fn raw_request(&mut self, kind: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> std::io::Result<u64> {
        self.request(kind, flags, offset, len, payload)
    }

    pub fn disconnect(mut self) {
        let _ = self.request(2, 0, 0, 0, &[]);
    }
}

pub fn send_option(s: &mut TcpStream, opt: u32, data: &[u8]) -> std::io::Result<()> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b)
}

/// Reads one option reply: (reply type, data).
pub fn read_option_reply(s: &mut TcpStream) -> std::io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h)?;
    assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), 0x0003e889045565a9, "option reply magic");
    let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d)?;
    Ok((typ, d))
}
