//! OpenSSH public keys that users hand in as account keys: parsed, vetted and fingerprinted.
//! Only keys a current OpenSSH server takes as strong user keys get through: Ed25519, ECDSA
//! on the NIST curves, their FIDO security-key forms, and RSA of at least 3072 bits. What a
//! workspace receives is the key rebuilt from its parsed form (`<algorithm> <base64>`), never
//! the line as sent: no options (`command=`, `from=`), no comment, nothing that could add a
//! second line to an `authorized_keys` file.

use ssh_key::public::KeyData;
use ssh_key::{HashAlg, PublicKey};

/// The smallest RSA modulus accepted, in bits (NIST's floor for keys used past 2030).
pub const MIN_RSA_BITS: usize = 3072;

/// The longest line accepted (an RSA key of 16384 bits is about 2,800 characters).
pub const MAX_LINE: usize = 8192;

/// The longest key name, in characters.
pub const MAX_NAME: usize = 64;

/// A key that passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VettedKey {
    /// The key as workspaces get it: `<algorithm> <base64>`.
    pub key: String,
    /// Its algorithm as OpenSSH names it (`ssh-ed25519`, `ssh-rsa`, ...).
    pub algorithm: String,
    /// `SHA256:<base64>`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
    /// The comment the line carried (empty if none): the default name.
    pub comment: String,
}

/// Parses and vets one public key line; the error says why it is refused, in words a user
/// can act on.
pub fn vet(line: &str) -> Result<VettedKey, String> {
    let line = line.trim();
    if line.is_empty() {
        return Err("public_key is empty".into());
    }
    if line.len() > MAX_LINE {
        return Err(format!("public_key is longer than {MAX_LINE} characters"));
    }
    if line.starts_with("-----BEGIN") {
        return Err("public_key is a private key: send the contents of the .pub file, and keep this one secret".into());
    }
    if line.contains(['\n', '\r']) {
        return Err("public_key must be one line (one key per request)".into());
    }
    let parsed = PublicKey::from_openssh(line).map_err(|e| {
        format!("public_key is not an OpenSSH public key (\"ssh-ed25519 AAAA... comment\", without options): {e}")
    })?;
    match parsed.key_data() {
        KeyData::Ed25519(_) | KeyData::SkEd25519(_) | KeyData::Ecdsa(_) | KeyData::SkEcdsaSha2NistP256(_) => {}
        KeyData::Rsa(rsa) => {
            let bits = modulus_bits(rsa.n.as_positive_bytes().unwrap_or_default());
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "public_key is an RSA key of {bits} bits; at least {MIN_RSA_BITS} are required (or use ssh-keygen -t ed25519)"
                ));
            }
        }
        KeyData::Dsa(_) => return Err("public_key is a DSA key, which OpenSSH no longer accepts; use ssh-keygen -t ed25519".into()),
        other => return Err(format!("public_key has algorithm {}, which is not accepted", other.algorithm())),
    }
    let bare = PublicKey::new(parsed.key_data().clone(), "");
    let key = bare.to_openssh().map_err(|e| format!("public_key cannot be encoded again: {e}"))?.trim().to_string();
    Ok(VettedKey {
        key,
        algorithm: parsed.algorithm().to_string(),
        fingerprint: parsed.fingerprint(HashAlg::Sha256).to_string(),
        comment: parsed.comment().trim().to_string(),
    })
}

/// Checks a key name: 1 to [`MAX_NAME`] characters, no control characters.
pub fn vet_name(name: &str) -> Result<String, String> {
    let name = name.trim();
    if name.is_empty() {
        return Err("name is empty (and the key has no comment to take it from)".into());
    }
    if name.chars().count() > MAX_NAME {
        return Err(format!("name is longer than {MAX_NAME} characters"));
    }
    if name.chars().any(char::is_control) {
        return Err("name must not contain control characters".into());
    }
    Ok(name.to_string())
}

/// The size in bits of a big-endian unsigned integer.
fn modulus_bits(bytes: &[u8]) -> usize {
    let bytes = match bytes.iter().position(|b| *b != 0) {
        Some(i) => &bytes[i..],
        None => return 0,
    };
    bytes.len() * 8 - bytes[0].leading_zeros() as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    // Public keys made with OpenSSH 9.2's ssh-keygen; the fingerprints are what `ssh-keygen -l`
    // printed for them.
    const ED25519: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMsPYWUBvbtIOCU/jWO+Z73Es8vVe17lnQeHcpNTgfNn user@laptop";
    const ECDSA256: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBGEnkVO5CvmrM1mliV06FSOv12bnmiV0TnIAJR1Ju7VmQoWan+olcgaliQAe1316mUvyOVP0R6acuvltGd93IKU= user@laptop";
    const RSA2048: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC4zjn3va5eNC6WNw+XpJyrWB9UDAHbjsrEWhW0kbFkTM3liCTdqjJ/Q/qLxP9NeWWs/rAObxhh+3eKIyMNxZomJVv1Vj+7HztqEJ7/NyIDNGKUDktwQNWKGtQT+SHktnXmWJDBPAV2fThe+wpajk0KzVjG8TppvmyriKxvUrtv66UBTIL04Fu/lf6PiBziuytIr6nDNI7DbeSRNoOgDbc4gzzcHnYBhXlQU5BzMIKd0QpMSnnaVzdcl3GTKfPBTImqOkb5HhrDmKrEABKtBdgqk0DpuY5Gyyxyt6M0ac/vBzwSI6D6VGi1XFhlCQg0bbPY3qiShyIfwZmE1Pp+Go0t user@laptop";
    const RSA3072: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABgQCUqofaFGoRYza9X4bBzoEi5Zrx+baM6NH7Ge3431w+YHXq8O42kY9CSCZ0wH2FJODLdY+NNeGh2JPGDWo9zmTHGLMvBlPDES45HzBxl92aJ7oxk9JXTCVkqH7q5TWY5VAwhm4NbZ1QDqJMFtMBFgJTJJc6+DN7VBudpAf7SHzdBecF+lwSiacMy69iqVJJlUBpIPHHU9baSY6w1Mh84Pf7RTOkwvYVG3dVqtdED7nnjWX8+dTLlP26NIJyIalEbMvDwZWro+3M6NVlx+jjQdjiEcyic7ToikRaHJGEuqOt2xZR+WuKd8u/Z+h2l1iRMInU/XPrhEur116hy2dHGZC483kEZaUuuaZUS/janM67QZ6+E++H19FhTFArQrzVXehpWOweMd+F8O/GipUP2MRPrJ/CY4FWGATG3/8e7uU716HpnYMmOxAN/1y8U+JLWAF0N7v8SnVlT2FyEnxzsOwHy3TSLBQEG2qEeCQPg0yCZ2aI+XxXtLyFShARsj9xl4M= user@laptop";
    const DSA: &str = "ssh-dss AAAAB3NzaC1kc3MAAACBAJs8shgWQDtTHbEZgCZHt9CrLUCRttf2kLFyvtJllrVIMx7AfVKI/I1oU9ef6TK5fM79uKZStfCBSIjbfCQHjZjM+xTCKfycBzqObEw7HOMHP6cOY9cjn1rINBBjMaR2fu8kARZ9jkfZZGaYE9ulBTr7hvr7UIJ7cJ9Q7ydNVMi5AAAAFQDxSlVAmerNjfYbwJklHNwmrB6A8wAAAIB+yLTmpG9JVqXJSBZzwRuPbfTgr2j0od5b7AzrJdOzX/gxjoCxGLT7ZQ3fUwjEYMlNFcQZXiB7UbxEbRtqQui+39Kr1boNjBEyILgvjpZ19Y0FuvOSB2WMiAPwQn20nbjTeAP56NbbOvZwSD3imjPPwIv22rh3JthW7o+yKL4TqwAAAIB7wROt6sYtCNnt++c0CkziPo/9F20ckSRJeOyAk8MF0yKuj/GxYN88THPDWO2Jqhdea9jRylajGtr+veF1l8Cgudmum2znM+ud9McmRD87UUy+WSG85G+dVIkk85c6m9yrnBw7JdWS3viGI9KqDeR0ZQfStP7ac83Njzc55VcJgw== user@laptop";

    #[test]
    fn strong_keys_pass_with_openssh_fingerprints_and_without_their_comment() {
        for (line, algorithm, fingerprint) in [
            (ED25519, "ssh-ed25519", "SHA256:pwu8nZuMBIUdMnPTAlJnugXim+bOZsrSIG/O+PHySjA"),
            (ECDSA256, "ecdsa-sha2-nistp256", "SHA256:3N9uLnRKgqqkzqqJn8b/8qMQJdSM/hChtMvQGGYMuh4"),
            (RSA3072, "ssh-rsa", "SHA256:5aupfZijaMJzxHcUnf34Ssp6b1sOQhDo4cKjsGAcvcw"),
        ] {
            let k = vet(&format!("  {line}\n")).unwrap_or_else(|e| panic!("{algorithm}: {e}"));
            assert_eq!(k.algorithm, algorithm);
            assert_eq!(k.fingerprint, fingerprint, "{algorithm}");
            assert_eq!(k.comment, "user@laptop");
            let words: Vec<&str> = line.split(' ').collect();
            assert_eq!(k.key, format!("{} {}", words[0], words[1]), "{algorithm}: rebuilt without the comment");
        }
    }

    #[test]
    fn weak_foreign_and_malformed_keys_are_refused_with_the_reason() {
        let refused = |line: &str| vet(line).expect_err(line);
        assert!(refused(RSA2048).contains("RSA key of 2048 bits; at least 3072"), "{}", refused(RSA2048));
        assert!(refused(DSA).contains("DSA"), "{}", refused(DSA));
        assert!(refused("").contains("empty"));
        assert!(refused("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE=\n").contains("private key"));
        assert!(refused(&format!("{ED25519}\n{ED25519}")).contains("one line"));
        // Options would let a key run a command of its own in the workspace's authorized_keys.
        assert!(refused(&format!("command=\"id\" {ED25519}")).contains("not an OpenSSH public key"));
        assert!(refused("ssh-ed25519 AAAAnotbase64!!").contains("not an OpenSSH public key"));
        // A truncated paste: the base64 of the key is cut.
        assert!(refused(&ED25519[..60]).contains("not an OpenSSH public key"));
        assert!(refused(&"a".repeat(MAX_LINE + 1)).contains("longer than"));
    }

    #[test]
    fn names_are_short_printable_lines() {
        assert_eq!(vet_name("  laptop ").as_deref(), Ok("laptop"));
        assert!(vet_name("").is_err());
        assert!(vet_name(&"x".repeat(MAX_NAME + 1)).unwrap_err().contains("longer"));
        assert!(vet_name("a\nb").unwrap_err().contains("control"));
        assert_eq!(vet_name(&"ü".repeat(MAX_NAME)).map(|n| n.chars().count()), Ok(MAX_NAME));
    }

    #[test]
    fn modulus_bits_ignore_leading_zero_bytes() {
        assert_eq!(modulus_bits(&[0, 0x80, 0]), 16);
        assert_eq!(modulus_bits(&[0x01, 0xff]), 9);
        assert_eq!(modulus_bits(&[0, 0]), 0);
    }
}
