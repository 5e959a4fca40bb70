//! NBD protocol (fixed newstyle), without I/O: constants, the option
//! negotiation state machine and request validation. The server
//! (`server.rs`) reads bytes, calls these functions and writes what they
//! return; tests and fuzzers drive them with arbitrary bytes.
//!
//! Spec: `doc/proto.md` of the NetworkBlockDevice project. All integers on
//! the wire are big-endian.

pub const NBDMAGIC: u64 = 0x4e42444d41474943;
pub const IHAVEOPT: u64 = 0x49484156454F5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003e889045565a9;
pub const REQUEST_MAGIC: u32 = 0x25609513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x67446698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e33ef;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
pub const FLAG_C_NO_ZEROES: u32 = 2;

pub const TF_HAS_FLAGS: u16 = 1;
pub const TF_READ_ONLY: u16 = 2;
pub const TF_SEND_FLUSH: u16 = 4;
pub const TF_SEND_FUA: u16 = 8;
pub const TF_SEND_TRIM: u16 = 0x20;
pub const TF_SEND_WRITE_ZEROES: u16 = 0x40;
pub const TF_SEND_DF: u16 = 0x80;
pub const TF_CAN_MULTI_CONN: u16 = 0x100;
pub const TF_SEND_CACHE: u16 = 0x400;
pub const TF_SEND_FAST_ZERO: u16 = 0x800;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1;
pub const CMD_FLAG_NO_HOLE: u16 = 2;
pub const CMD_FLAG_DF: u16 = 4;
pub const CMD_FLAG_REQ_ONE: u16 = 8;
pub const CMD_FLAG_FAST_ZERO: u16 = 16;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = 0x8001;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ESHUTDOWN: u32 = 108;

pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

/// The one metadata context we serve.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Context id handed out for `base:allocation` by SET_META_CONTEXT.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// What the handshake needs to know about an export.
#[derive(Clone, Debug)]
pub struct ExportInfo {
    pub name: String,
    pub size: u64,
    pub read_only: bool,
}

impl ExportInfo {
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_CAN_MULTI_CONN | TF_SEND_CACHE;
        // A read-only export offers no command that changes it (as
        // qemu-nbd -r does); one sent anyway still fails with EPERM.
        if self.read_only {
            f |= TF_READ_ONLY;
        } else {
            f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
        }
        if structured {
            f |= TF_SEND_DF;
        }
        f
    }
}

/// Looks exports up by name (the site's volumes and, later, snapshots).
pub trait ExportLookup {
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
    fn names(&self) -> Vec<String>;
}

/// One option reply to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

impl OptReply {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.option.to_be_bytes());
        out.extend_from_slice(&self.kind.to_be_bytes());
        out.extend_from_slice(&(self.data.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.data);
    }
    fn ack(option: u32) -> OptReply {
        OptReply { option, kind: REP_ACK, data: Vec::new() }
    }
    fn err(option: u32, kind: u32, msg: impl Into<String>) -> OptReply {
        let mut m: String = msg.into();
        // Cut before a character, not inside one (the message may quote a
        // client's export name).
        let mut n = m.len().min(crate::limits::NBD_NAME_BYTES_MAX);
        while !m.is_char_boundary(n) {
            n -= 1;
        }
        m.truncate(n);
        OptReply { option, kind, data: m.into_bytes() }
    }
}

/// What to do after an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Send the replies and read the next option.
    Continue,
    /// Send the replies and enter transmission on this export.
    Transmit(ExportInfo2),
    /// Send the replies (if any), then close; the reason is logged.
    Close(String),
}

/// Export chosen for transmission, with the negotiated features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo2 {
    pub name: String,
    pub structured: bool,
    pub block_status: bool,
    /// EXPORT_NAME reply (size, flags, maybe zeroes) must be sent raw.
    pub export_name_reply: Option<Vec<u8>>,
}

/// Negotiation state of one connection.
#[derive(Debug, Default)]
pub struct Handshake {
    pub no_zeroes: bool,
    pub structured: bool,
    /// Export for which base:allocation was selected by the last SET_META_CONTEXT.
    pub meta_export: Option<String>,
    pub options_seen: u32,
}

/// Reads a big-endian field from a slice, with a name for the error.
struct Rd<'a> {
    b: &'a [u8],
}
impl<'a> Rd<'a> {
    fn u16(&mut self) -> Option<u16> {
        let (h, t) = self.b.split_first_chunk::<2>()?;
        self.b = t;
        Some(u16::from_be_bytes(*h))
    }
    fn u32(&mut self) -> Option<u32> {
        let (h, t) = self.b.split_first_chunk::<4>()?;
        self.b = t;
        Some(u32::from_be_bytes(*h))
    }
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }
    fn string(&mut self, n: usize) -> Option<Result<String, ()>> {
        let b = self.bytes(n)?;
        Some(String::from_utf8(b.to_vec()).map_err(|_| ()))
    }
}

/// Parses client flags sent after the server greeting.
pub fn check_client_flags(h: &mut Handshake, flags: u32) -> Result<(), String> {
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(format!("client sent unknown handshake flags {flags:#x}"));
    }
    h.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
    Ok(())
}

/// Resolves an export name; the empty name is the default export `vol0`.
fn resolve(exports: &dyn ExportLookup, name: &str) -> Option<ExportInfo> {
    if name.is_empty() {
        exports.lookup("vol0")
    } else {
        exports.lookup(name)
    }
}

/// Handles one option (already read in full, `data.len()` within limits).
pub fn handle_option(h: &mut Handshake, exports: &dyn ExportLookup, option: u32, data: &[u8]) -> (Vec<OptReply>, Next) {
    h.options_seen += 1;
    match option {
        OPT_EXPORT_NAME => {
            let name = String::from_utf8_lossy(data).into_owned();
            match resolve(exports, &name) {
                None => (vec![], Next::Close(format!("unknown export {name:?} requested with NBD_OPT_EXPORT_NAME"))),
                Some(e) => {
                    let mut raw = Vec::with_capacity(134);
                    raw.extend_from_slice(&e.size.to_be_bytes());
                    raw.extend_from_slice(&e.transmission_flags(h.structured).to_be_bytes());
                    if !h.no_zeroes {
                        raw.extend_from_slice(&[0u8; 124]);
                    }
                    let bs = h.meta_export.as_deref() == Some(e.name.as_str());
                    (vec![], Next::Transmit(ExportInfo2 { name: e.name, structured: h.structured, block_status: bs, export_name_reply: Some(raw) }))
                }
            }
        }
        OPT_ABORT => (vec![OptReply::ack(option)], Next::Close("client sent NBD_OPT_ABORT".into())),
        OPT_LIST => {
            if !data.is_empty() {
                return (vec![OptReply::err(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")], Next::Continue);
            }
            let mut r: Vec<OptReply> = exports
                .names()
                .into_iter()
                .map(|n| {
                    let mut d = (n.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(n.as_bytes());
                    OptReply { option, kind: REP_SERVER, data: d }
                })
                .collect();
            r.push(OptReply::ack(option));
            (r, Next::Continue)
        }
        OPT_STARTTLS => (vec![OptReply::err(option, REP_ERR_POLICY, "TLS is not offered on this NBD listener")], Next::Continue),
        OPT_STRUCTURED_REPLY => {
            if !data.is_empty() {
                return (vec![OptReply::err(option, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")], Next::Continue);
            }
            h.structured = true;
            (vec![OptReply::ack(option)], Next::Continue)
        }
        OPT_INFO | OPT_GO => info_or_go(h, exports, option, data),
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => meta_context(h, exports, option, data),
        _ => (vec![OptReply::err(option, REP_ERR_UNSUP, format!("option {option} is not supported"))], Next::Continue),
    }
}

fn info_or_go(h: &mut Handshake, exports: &dyn ExportLookup, option: u32, data: &[u8]) -> (Vec<OptReply>, Next) {
    let invalid = |m: &str| (vec![OptReply::err(option, REP_ERR_INVALID, m)], Next::Continue);
    let mut r = Rd { b: data };
    let Some(nlen) = r.u32() else { return invalid("option data too short for the export name length") };
    if nlen as usize > crate::limits::NBD_NAME_BYTES_MAX || nlen as usize + 6 > data.len() {
        return invalid("export name length runs past the option data");
    }
    let Some(Ok(name)) = r.string(nlen as usize) else { return invalid("export name is not UTF-8") };
    let Some(nreq) = r.u16() else { return invalid("option data too short for the info request count") };
    if r.b.len() != nreq as usize * 2 {
        return invalid("info request list length does not match its count");
    }
    let mut wants_name = false;
    for _ in 0..nreq {
        if r.u16() == Some(INFO_NAME) {
            wants_name = true;
        }
    }
    let Some(e) = resolve(exports, &name) else {
        return (vec![OptReply::err(option, REP_ERR_UNKNOWN, format!("unknown export {name:?}"))], Next::Continue);
    };
    let mut replies = Vec::new();
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&e.size.to_be_bytes());
    d.extend_from_slice(&e.transmission_flags(h.structured).to_be_bytes());
    replies.push(OptReply { option, kind: REP_INFO, data: d });
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&(crate::limits::BLOCK_BYTES as u32).to_be_bytes());
    d.extend_from_slice(&crate::limits::NBD_REQUEST_BYTES_MAX.to_be_bytes());
    replies.push(OptReply { option, kind: REP_INFO, data: d });
    if wants_name {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(e.name.as_bytes());
        replies.push(OptReply { option, kind: REP_INFO, data: d });
    }
    replies.push(OptReply::ack(option));
    if option == OPT_GO {
        let bs = h.meta_export.as_deref() == Some(e.name.as_str()) || (name.is_empty() && h.meta_export.as_deref() == Some(""));
        (replies, Next::Transmit(ExportInfo2 { name: e.name, structured: h.structured, block_status: bs && h.structured, export_name_reply: None }))
    } else {
        (replies, Next::Continue)
    }
}

fn meta_context(h: &mut Handshake, exports: &dyn ExportLookup, option: u32, data: &[u8]) -> (Vec<OptReply>, Next) {
    let set = option == OPT_SET_META_CONTEXT;
    if set {
        // SET replaces the previous selection even when it fails.
        h.meta_export = None;
    }
    let invalid = |m: &str| (vec![OptReply::err(option, REP_ERR_INVALID, m)], Next::Continue);
    if !h.structured {
        return invalid("metadata contexts need structured replies (NBD_OPT_STRUCTURED_REPLY) first");
    }
    let mut r = Rd { b: data };
    let Some(nlen) = r.u32() else { return invalid("option data too short for the export name length") };
    if nlen as usize > crate::limits::NBD_NAME_BYTES_MAX {
        return invalid("export name too long");
    }
    let Some(Ok(name)) = r.string(nlen as usize) else { return invalid("export name missing or not UTF-8") };
    let Some(nq) = r.u32() else { return invalid("option data too short for the query count") };
    let mut queries = Vec::new();
    for _ in 0..nq {
        let Some(ql) = r.u32() else { return invalid("query length runs past the option data") };
        let Some(Ok(q)) = r.string(ql as usize) else { return invalid("query runs past the option data or is not UTF-8") };
        queries.push(q);
    }
    if !r.b.is_empty() {
        return invalid("trailing bytes after the queries");
    }
    if resolve(exports, &name).is_none() {
        return (vec![OptReply::err(option, REP_ERR_UNKNOWN, format!("unknown export {name:?}"))], Next::Continue);
    }
    let matches = if set {
        queries.iter().any(|q| q == BASE_ALLOCATION)
    } else {
        queries.is_empty() || queries.iter().any(|q| q == BASE_ALLOCATION || q == "base:")
    };
    let mut replies = Vec::new();
    if matches {
        let mut d = (if set { BASE_ALLOCATION_ID } else { 0 }).to_be_bytes().to_vec();
        d.extend_from_slice(BASE_ALLOCATION.as_bytes());
        replies.push(OptReply { option, kind: REP_META_CONTEXT, data: d });
        if set {
            h.meta_export = Some(name);
        }
    }
    replies.push(OptReply::ack(option));
    (replies, Next::Continue)
}

/// A parsed transmission request header (28 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

/// Parses a request header. `Err` means the stream cannot be trusted any
/// more (bad magic) and the connection must be closed.
pub fn parse_request(b: &[u8; 28]) -> Result<Request, String> {
    let magic = u32::from_be_bytes(b[0..4].try_into().unwrap());
    if magic != REQUEST_MAGIC {
        return Err(format!("bad request magic {magic:#010x}"));
    }
    Ok(Request {
        flags: u16::from_be_bytes(b[4..6].try_into().unwrap()),
        kind: u16::from_be_bytes(b[6..8].try_into().unwrap()),
        handle: u64::from_be_bytes(b[8..16].try_into().unwrap()),
        offset: u64::from_be_bytes(b[16..24].try_into().unwrap()),
        length: u32::from_be_bytes(b[24..28].try_into().unwrap()),
    })
}

/// A request that passed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read { offset: u64, len: u32 },
    Write { offset: u64, len: u32, fua: bool },
    Flush,
    Trim { offset: u64, len: u32, fua: bool },
    WriteZeroes { offset: u64, len: u32, fua: bool, no_hole: bool },
    BlockStatus { offset: u64, len: u32, req_one: bool },
    Cache,
    Disconnect,
}

/// Checks a request against the export and negotiated features. Returns
/// the command, or the NBD error to reply with and a reason for the log.
/// (A WRITE's payload must still be read off the wire whatever this says.)
pub fn validate(req: &Request, size: u64, read_only: bool, block_status: bool) -> Result<Command, (u32, String)> {
    let allowed = match req.kind {
        CMD_READ => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        CMD_DISC => 0xffff,
        k => return Err((EINVAL, format!("unknown command {k}"))),
    };
    if req.flags & !allowed != 0 {
        return Err((EINVAL, format!("command {} does not take flags {:#x}", req.kind, req.flags & !allowed)));
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let (offset, len) = (req.offset, req.length);
    let end_ok = offset.checked_add(len as u64).is_some_and(|e| e <= size);
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && read_only {
        return Err((crate::nbd::proto::EPERM, "write to a read-only export".into()));
    }
    match req.kind {
        CMD_READ => {
            if len > crate::limits::NBD_REQUEST_BYTES_MAX {
                return Err((EINVAL, format!("read of {len} bytes exceeds the {} byte limit", crate::limits::NBD_REQUEST_BYTES_MAX)));
            }
            if !end_ok {
                return Err((EINVAL, format!("read {offset}+{len} past the end of the export ({size} bytes)")));
            }
            Ok(Command::Read { offset, len })
        }
        CMD_WRITE => {
            if !end_ok {
                return Err((ENOSPC, format!("write {offset}+{len} past the end of the export ({size} bytes)")));
            }
            Ok(Command::Write { offset, len, fua })
        }
        CMD_FLUSH => Ok(Command::Flush),
        CMD_TRIM => {
            if !end_ok {
                return Err((EINVAL, format!("trim {offset}+{len} past the end of the export ({size} bytes)")));
            }
            Ok(Command::Trim { offset, len, fua })
        }
        CMD_WRITE_ZEROES => {
            if !end_ok {
                return Err((ENOSPC, format!("write-zeroes {offset}+{len} past the end of the export ({size} bytes)")));
            }
            Ok(Command::WriteZeroes { offset, len, fua, no_hole: req.flags & CMD_FLAG_NO_HOLE != 0 })
        }
        CMD_BLOCK_STATUS => {
            if !block_status {
                return Err((EINVAL, "block status without base:allocation selected".into()));
            }
            if len == 0 || !end_ok {
                return Err((EINVAL, format!("block status {offset}+{len} is empty or past the end of the export ({size} bytes)")));
            }
            Ok(Command::BlockStatus { offset, len, req_one: req.flags & CMD_FLAG_REQ_ONE != 0 })
        }
        // Nothing to do (every read is from the log), but the range is
        // checked as a read's: past the end is an error, not a success.
        CMD_CACHE if !end_ok => Err((EINVAL, format!("cache {offset}+{len} past the end of the export ({size} bytes)"))),
        CMD_CACHE => Ok(Command::Cache),
        _ => Ok(Command::Disconnect),
    }
}

/// Encodes a simple reply header.
pub fn simple_reply(out: &mut Vec<u8>, error: u32, handle: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
}

/// Encodes a structured reply chunk header.
pub fn chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, handle: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Encodes an error reply (structured when negotiated, so it carries a message).
pub fn error_reply(structured: bool, error: u32, handle: u64, msg: &str) -> Vec<u8> {
    let mut out = Vec::new();
    if structured {
        let m = &msg.as_bytes()[..msg.len().min(1024)];
        chunk_header(&mut out, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, 6 + m.len() as u32);
        out.extend_from_slice(&error.to_be_bytes());
        out.extend_from_slice(&(m.len() as u16).to_be_bytes());
        out.extend_from_slice(m);
    } else {
        simple_reply(&mut out, error, handle);
    }
    out
}

#[cfg(test)]
mod tests;
