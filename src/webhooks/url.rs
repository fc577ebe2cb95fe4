//! Which callback URLs tallyd sends to. A callback to a loopback, link-local,
//! private or otherwise internal address would let a tenant make the daemon
//! call services beside it (SSRF), so those are refused unless the operator
//! allows them (`[webhooks] allow_loopback`, `allow_private`). A host name is
//! checked again on every send against the addresses it resolves to then.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The longest callback URL accepted.
pub const MAX_URL_LEN: usize = 2048;

/// Which internal addresses callbacks may go to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UrlPolicy {
    /// 127.0.0.0/8, ::1, `localhost`, and the unspecified addresses 0.0.0.0/8
    /// and :: (which reach this host).
    pub allow_loopback: bool,
    /// Private (10/8, 172.16/12, 192.168/16, fc00::/7), link-local
    /// (169.254/16, fe80::/10), CGNAT and other internal ranges.
    pub allow_private: bool,
}

/// Why an address may not be called, or `None` if it may.
pub fn refused_ip(ip: IpAddr, policy: UrlPolicy) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    };
    // The unspecified address (0.0.0.0/8, ::) reaches this host when
    // connected to: loopback, whatever else private addresses may be.
    let unspecified = match ip {
        IpAddr::V4(v4) => v4.octets()[0] == 0,
        IpAddr::V6(v6) => v6.is_unspecified(),
    };
    if ip.is_loopback() || unspecified {
        return (!policy.allow_loopback).then_some("a loopback address");
    }
    let internal = match ip {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => internal_v6(v6),
    };
    (internal && !policy.allow_private).then_some("a private, link-local or internal address")
}

fn internal_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    // 0.0.0.0/8 is loopback here (see `refused_ip`).
    ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || (o[0] == 100 && (64..128).contains(&o[1]))
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
        || (o[0] == 198 && (18..20).contains(&o[1]))
        || o[0] >= 240
}

fn internal_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    // `::` is loopback here (see `refused_ip`).
    ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00
        || (s[0] & 0xffc0) == 0xfe80
        || (s[0] == 0x2001 && s[1] == 0x0db8)
        || (s[0] == 0x64 && s[1] == 0xff9b)
}

/// Checks a callback URL as given: `http` or `https`, a host, at most
/// [`MAX_URL_LEN`] bytes, no credentials, and (for an IP literal or
/// `localhost`) an address the policy allows. The message names the problem.
pub fn check_callback_url(raw: &str, policy: UrlPolicy) -> Result<::url::Url, String> {
    if raw.len() > MAX_URL_LEN {
        return Err(format!(
            "is {} bytes long; at most {MAX_URL_LEN} are accepted",
            raw.len()
        ));
    }
    let url = ::url::Url::parse(raw).map_err(|e| format!("is not a valid URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "has scheme {:?}; only http and https are accepted",
            url.scheme()
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry a user name or password".to_owned());
    }
    let ip = match url.host() {
        None => return Err("has no host".to_owned()),
        Some(::url::Host::Ipv4(v4)) => IpAddr::V4(v4),
        Some(::url::Host::Ipv6(v6)) => IpAddr::V6(v6),
        Some(::url::Host::Domain(d)) => {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            if d == "localhost" || d.ends_with(".localhost") {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                return Ok(url);
            }
        }
    };
    match refused_ip(ip, policy) {
        Some(why) => Err(format!(
            "points to {why} ({ip}), which callbacks may not reach unless [webhooks] allows it"
        )),
        None => Ok(url),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: UrlPolicy = UrlPolicy {
        allow_loopback: false,
        allow_private: false,
    };

    #[test]
    fn internal_addresses_are_refused_unless_allowed() {
        for bad in [
            "http://127.0.0.1:8080/x",
            "http://localhost/x",
            "http://[::1]/x",
            "http://10.1.2.3/",
            "http://169.254.169.254/latest/meta-data",
            "http://192.168.0.10/",
            "http://[fe80::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://0.0.0.0/",
        ] {
            assert!(check_callback_url(bad, NONE).is_err(), "{bad}");
        }
        let lo = UrlPolicy {
            allow_loopback: true,
            allow_private: false,
        };
        assert!(check_callback_url("http://127.0.0.1:8080/x", lo).is_ok());
        assert!(check_callback_url("http://10.1.2.3/", lo).is_err());
        // Private addresses allowed, loopback not: the unspecified address
        // reaches this host, so it is loopback.
        let private = UrlPolicy {
            allow_loopback: false,
            allow_private: true,
        };
        assert!(check_callback_url("http://10.1.2.3/", private).is_ok());
        for bad in [
            "http://0.0.0.0:8080/",
            "http://0.1.2.3/",
            "http://[::]:8080/",
            "http://[::ffff:0.0.0.0]/",
        ] {
            assert!(check_callback_url(bad, private).is_err(), "{bad}");
        }
        assert!(check_callback_url("https://example.com/hook?a=1", NONE).is_ok());
    }

    #[test]
    fn malformed_urls_name_the_problem() {
        let e = check_callback_url("ftp://example.com/", NONE).unwrap_err();
        assert!(e.contains("ftp"), "{e}");
        let e = check_callback_url("not a url", NONE).unwrap_err();
        assert!(e.contains("not a valid URL"), "{e}");
        let e = check_callback_url("http://u:p@example.com/", NONE).unwrap_err();
        assert!(e.contains("password"), "{e}");
        let long = format!("https://example.com/{}", "a".repeat(3000));
        assert!(check_callback_url(&long, NONE)
            .unwrap_err()
            .contains("bytes"));
    }
}
