//! Handshake and request-parser tests: exact replies for the spec's cases,
//! and property tests that arbitrary bytes never panic.

use proptest::prelude::*;

use super::*;

struct Two;
impl ExportLookup for Two {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        match name {
            "vol0" => Some(ExportInfo { name: "vol0".into(), size: 1 << 20, read_only: false }),
            "ro" => Some(ExportInfo { name: "ro".into(), size: 4096, read_only: true }),
            _ => None,
        }
    }
    fn names(&self) -> Vec<String> {
        vec!["vol0".into(), "ro".into()]
    }
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

#[test]
fn go_known_export_sends_export_info_then_ack() {
    let mut h = Handshake::default();
    let (r, next) = handle_option(&mut h, &Two, OPT_GO, &go_data("vol0", &[INFO_NAME]));
    assert_eq!(r[0].kind, REP_INFO);
    assert_eq!(&r[0].data[0..2], &INFO_EXPORT.to_be_bytes());
    assert_eq!(u64::from_be_bytes(r[0].data[2..10].try_into().unwrap()), 1 << 20);
    assert!(r.iter().any(|x| x.kind == REP_INFO && x.data[0..2] == INFO_NAME.to_be_bytes()));
    assert_eq!(r.last().unwrap().kind, REP_ACK);
    assert!(matches!(next, Next::Transmit(ref t) if t.name == "vol0"));
}

#[test]
fn unknown_export_is_refused_with_its_name() {
    let mut h = Handshake::default();
    let (r, next) = handle_option(&mut h, &Two, OPT_GO, &go_data("nope", &[]));
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kind, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&r[0].data).contains("nope"));
    assert_eq!(next, Next::Continue);
    let (r, next) = handle_option(&mut h, &Two, OPT_EXPORT_NAME, b"nope");
    assert!(r.is_empty());
    assert!(matches!(next, Next::Close(ref m) if m.contains("nope")));
}

/// An unknown export whose name puts a multi-byte character across the
/// 4096-byte cut of the error message: the message is cut before that
/// character (cutting inside it panicked, on unauthenticated input).
#[test]
fn an_error_message_is_cut_at_a_character_boundary() {
    let name = format!("a{}", "é".repeat(2047));
    assert_eq!(name.len(), 4095);
    let mut h = Handshake::default();
    for opt in [OPT_GO, OPT_INFO] {
        let (r, next) = handle_option(&mut h, &Two, opt, &go_data(&name, &[]));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].kind, REP_ERR_UNKNOWN);
        assert!(r[0].data.len() <= crate::limits::NBD_NAME_BYTES_MAX);
        let m = std::str::from_utf8(&r[0].data).expect("the cut message is still UTF-8");
        assert!(m.contains("aé"), "{m}");
        assert_eq!(next, Next::Continue);
    }
}

#[test]
fn malformed_options_get_invalid() {
    let mut h = Handshake::default();
    for bad in [vec![0, 0, 0], vec![0, 0, 0, 200, b'a'], {
        let mut d = go_data("vol0", &[1]);
        d.push(0);
        d
    }] {
        let (r, next) = handle_option(&mut h, &Two, OPT_INFO, &bad);
        assert_eq!(r[0].kind, REP_ERR_INVALID, "{bad:?}");
        assert_eq!(next, Next::Continue);
    }
    let (r, _) = handle_option(&mut h, &Two, OPT_LIST, b"x");
    assert_eq!(r[0].kind, REP_ERR_INVALID);
    let (r, _) = handle_option(&mut h, &Two, 4242, b"whatever");
    assert_eq!(r[0].kind, REP_ERR_UNSUP);
}

#[test]
fn list_names_every_export() {
    let mut h = Handshake::default();
    let (r, _) = handle_option(&mut h, &Two, OPT_LIST, b"");
    assert_eq!(r.iter().filter(|x| x.kind == REP_SERVER).count(), 2);
    assert_eq!(r.last().unwrap().kind, REP_ACK);
}

#[test]
fn meta_context_needs_structured_and_selects_base_allocation() {
    let mut h = Handshake::default();
    let (r, _) = handle_option(&mut h, &Two, OPT_SET_META_CONTEXT, &meta_data("vol0", &[BASE_ALLOCATION]));
    assert_eq!(r[0].kind, REP_ERR_INVALID);
    handle_option(&mut h, &Two, OPT_STRUCTURED_REPLY, b"");
    let (r, _) = handle_option(&mut h, &Two, OPT_LIST_META_CONTEXT, &meta_data("vol0", &[]));
    assert_eq!(r[0].kind, REP_META_CONTEXT);
    let (r, _) = handle_option(&mut h, &Two, OPT_SET_META_CONTEXT, &meta_data("vol0", &["qemu:dirty-bitmap:x", BASE_ALLOCATION]));
    assert_eq!(r.len(), 2);
    assert_eq!(u32::from_be_bytes(r[0].data[0..4].try_into().unwrap()), BASE_ALLOCATION_ID);
    let (_, next) = handle_option(&mut h, &Two, OPT_GO, &go_data("vol0", &[]));
    assert!(matches!(next, Next::Transmit(ref t) if t.block_status && t.structured));
    // A SET for another export does not carry over.
    let mut h2 = Handshake::default();
    handle_option(&mut h2, &Two, OPT_STRUCTURED_REPLY, b"");
    handle_option(&mut h2, &Two, OPT_SET_META_CONTEXT, &meta_data("ro", &[BASE_ALLOCATION]));
    let (_, next) = handle_option(&mut h2, &Two, OPT_GO, &go_data("vol0", &[]));
    assert!(matches!(next, Next::Transmit(ref t) if !t.block_status));
}

#[test]
fn request_validation_follows_the_spec() {
    let req = |kind, flags, offset, length| Request { flags, kind, handle: 1, offset, length };
    assert_eq!(validate(&req(CMD_READ, 0, 0, 4096), 8192, false, false), Ok(Command::Read { offset: 0, len: 4096 }));
    assert_eq!(validate(&req(CMD_READ, 0, 4096, 8192), 8192, false, false).unwrap_err().0, EINVAL);
    assert_eq!(validate(&req(CMD_WRITE, 0, 4096, 8192), 8192, false, false).unwrap_err().0, ENOSPC);
    assert_eq!(validate(&req(CMD_WRITE_ZEROES, 0, 8192, 1), 8192, false, false).unwrap_err().0, ENOSPC);
    assert_eq!(validate(&req(CMD_TRIM, 0, 8192, 1), 8192, false, false).unwrap_err().0, EINVAL);
    assert_eq!(validate(&req(CMD_WRITE, 0, 0, 512), 8192, true, false).unwrap_err().0, EPERM);
    assert_eq!(validate(&req(CMD_TRIM, 0, 0, 512), 8192, true, false).unwrap_err().0, EPERM);
    assert_eq!(validate(&req(CMD_READ, 0, u64::MAX, 512), 8192, false, false).unwrap_err().0, EINVAL);
    assert_eq!(validate(&req(CMD_READ, 0, 0, 64 << 20), u64::MAX, false, false).unwrap_err().0, EINVAL);
    assert_eq!(validate(&req(99, 0, 0, 0), 8192, false, false).unwrap_err().0, EINVAL);
    assert_eq!(validate(&req(CMD_READ, CMD_FLAG_NO_HOLE, 0, 1), 8192, false, false).unwrap_err().0, EINVAL);
    assert_eq!(validate(&req(CMD_BLOCK_STATUS, 0, 0, 4096), 8192, false, false).unwrap_err().0, EINVAL);
    assert!(validate(&req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 4096), 8192, false, true).is_ok());
    assert!(validate(&req(CMD_WRITE, CMD_FLAG_FUA, 511, 513), 8192, false, false).is_ok());
    // CACHE: a read's range rules (it succeeded past the end before).
    assert_eq!(validate(&req(CMD_CACHE, 0, 0, 8192), 8192, false, false), Ok(Command::Cache));
    assert_eq!(validate(&req(CMD_CACHE, 0, 1 << 40, 4096), 8192, false, false).unwrap_err().0, EINVAL);
}

#[test]
fn bad_request_magic_closes() {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&0x12560953u32.to_be_bytes());
    assert!(parse_request(&b).is_err());
}

proptest! {
    #[test]
    fn options_never_panic(option in 0u32..16, data in proptest::collection::vec(any::<u8>(), 0..300), structured in any::<bool>()) {
        let mut h = Handshake { structured, ..Default::default() };
        let (replies, _) = handle_option(&mut h, &Two, option, &data);
        for r in replies {
            // Replies stay within the protocol's string limit.
            prop_assert!(r.data.len() <= 4096 + 64);
        }
    }

    #[test]
    fn structured_options_with_random_lengths(name in "[a-z0-9]{0,8}", claimed in any::<u32>(), tail in proptest::collection::vec(any::<u8>(), 0..40)) {
        let mut d = claimed.to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&tail);
        let mut h = Handshake { structured: true, ..Default::default() };
        for opt in [OPT_INFO, OPT_GO, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
            let _ = handle_option(&mut h, &Two, opt, &d);
        }
    }

    #[test]
    fn requests_never_panic(b in proptest::collection::vec(any::<u8>(), 28), size in any::<u64>(), ro in any::<bool>(), bs in any::<bool>()) {
        let raw: [u8; 28] = b.try_into().unwrap();
        if let Ok(r) = parse_request(&raw) {
            let _ = validate(&r, size, ro, bs);
        }
        let mut fixed = raw;
        fixed[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        let r = parse_request(&fixed).unwrap();
        // Anything accepted lies inside the export.
        if let Ok(Command::Read { offset, len } | Command::Write { offset, len, .. } | Command::Trim { offset, len, .. }
        | Command::WriteZeroes { offset, len, .. } | Command::BlockStatus { offset, len, .. }) = validate(&r, size, ro, bs)
        {
            prop_assert!(offset.checked_add(len as u64).unwrap() <= size);
        }
    }
}

/// A read-only export (a DR site's, a snapshot's) offers no command that
/// would change it; flush, FUA and cache stay, as with `qemu-nbd -r`.
#[test]
fn read_only_exports_offer_no_command_that_changes_them() {
    let e = |read_only| ExportInfo { name: "vol0".into(), size: 1 << 20, read_only };
    let ro = e(true).transmission_flags(true);
    assert_eq!(ro & (TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO), 0, "{ro:#x}");
    assert_eq!(ro & (TF_READ_ONLY | TF_SEND_FLUSH | TF_SEND_FUA | TF_CAN_MULTI_CONN), TF_READ_ONLY | TF_SEND_FLUSH | TF_SEND_FUA | TF_CAN_MULTI_CONN);
    let rw = e(false).transmission_flags(true);
    assert_eq!(rw & (TF_READ_ONLY | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO), TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO);
}
