//! SHA-1 (RFC 3174), only for the WebSocket handshake's `Sec-WebSocket-Accept`.
//!
//! The project depends on no hashing crate, and the handshake needs nothing more; SHA-1 is
//! broken for signatures, which does not matter for a value both sides compute openly.

/// The 20-byte SHA-1 digest of `data`.
pub fn digest(data: &[u8]) -> [u8; 20] {
    let mut state: [u32; 5] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476, 0xc3d2_e1f0];
    // Padding: a 1 bit, zeros up to 56 mod 64 bytes, then the message length in bits.
    let bit_length = (data.len() as u64).wrapping_mul(8);
    let mut message = Vec::with_capacity(data.len() + 72);
    message.extend_from_slice(data);
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&bit_length.to_be_bytes());

    for block in message.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (word, bytes) in w.iter_mut().zip(block.chunks_exact(4)) {
            *word = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = state;
        for (i, &word) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5a82_7999),
                20..=39 => (b ^ c ^ d, 0x6ed9_eba1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8f1b_bcdc),
                _ => (b ^ c ^ d, 0xca62_c1d6),
            };
            let next = a.rotate_left(5).wrapping_add(f).wrapping_add(e).wrapping_add(k).wrapping_add(word);
            (e, d, c, b, a) = (d, c, b.rotate_left(30), a, next);
        }
        for (s, v) in state.iter_mut().zip([a, b, c, d, e]) {
            *s = s.wrapping_add(v);
        }
    }

    let mut out = [0u8; 20];
    for (bytes, word) in out.chunks_exact_mut(4).zip(state) {
        bytes.copy_from_slice(&word.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02X}")).collect()
    }

    #[test]
    fn matches_rfc_3174_test_vectors() {
        let cases: [(Vec<u8>, &str); 4] = [
            (b"abc".to_vec(), "A9993E364706816ABA3E25717850C26C9CD0D89D"),
            (
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".to_vec(),
                "84983E441C3BD26EBAAE4AA1F95129E5E54670F1",
            ),
            (vec![b'a'; 1_000_000], "34AA973CD4C4DAA4F61EEB2BDBAD27316534016F"),
            (b"01234567".repeat(80), "DEA356A2CDDD90C7A7ECEDC5EBB563934F460452"),
        ];
        for (input, expected) in cases {
            assert_eq!(hex(&digest(&input)), expected, "input of {} bytes", input.len());
        }
    }

    #[test]
    fn pads_at_block_boundaries() {
        // 55 bytes fit the length in the same block, 56 need a second one, 64 fill one exactly.
        assert_eq!(hex(&digest(b"")), "DA39A3EE5E6B4B0D3255BFEF95601890AFD80709");
        assert_eq!(hex(&digest(&[b'a'; 55])), "C1C8BBDC22796E28C0E15163D20899B65621D65A");
        assert_eq!(hex(&digest(&[b'a'; 56])), "C2DB330F6083854C99D4B5BFB6E8F29F201BE699");
        assert_eq!(hex(&digest(&[b'a'; 64])), "0098BA824B5C16427BD7A1122A5A442A25EC644D");
    }
}
