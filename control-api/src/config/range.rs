//! Port ranges as written in configuration: `"20000-20999"` or one port `"20022"`.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

/// An inclusive range of TCP ports, written `"20000-20999"` (or one port, `"20022"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    /// First port of the range.
    pub start: u16,
    /// Last port of the range (inclusive).
    pub end: u16,
}

impl PortRange {
    /// Number of ports in the range.
    pub fn len(&self) -> u32 {
        u32::from(self.end) - u32::from(self.start) + 1
    }
    /// Always false: a range holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Whether `port` lies in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }
    /// Whether the two ranges share a port.
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.start <= other.end && other.start <= self.end
    }
    /// Whether `other` lies wholly inside this range.
    pub fn covers(&self, other: &PortRange) -> bool {
        self.start <= other.start && other.end <= self.end
    }
    /// Every port of the range.
    pub fn ports(&self) -> impl Iterator<Item = u16> {
        self.start..=self.end
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let parse = |t: &str| -> Result<u16, String> {
            let n: u64 = t
                .trim()
                .parse()
                .map_err(|_| format!("port range \"{s}\": \"{}\" is not a number", t.trim()))?;
            if n == 0 || n > 65535 {
                return Err(format!(
                    "port range \"{s}\": {n} is not a TCP port (valid ports are 1-65535)"
                ));
            }
            Ok(n as u16)
        };
        let (start, end) = (parse(a)?, parse(b)?);
        if start > end {
            return Err(format!("port range \"{s}\" is inverted (start {start} > end {end})"));
        }
        Ok(PortRange { start, end })
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::PortRange;

    #[test]
    fn port_ranges_parse_and_refuse() {
        assert_eq!("20000-20999".parse::<PortRange>(), Ok(PortRange { start: 20000, end: 20999 }));
        assert_eq!("22".parse::<PortRange>(), Ok(PortRange { start: 22, end: 22 }));
        assert!("20000-70000".parse::<PortRange>().expect_err("refused").contains("not a TCP port"));
        assert!("0-10".parse::<PortRange>().expect_err("refused").contains("not a TCP port"));
        assert!("30-20".parse::<PortRange>().expect_err("refused").contains("inverted"));
        assert!("a-b".parse::<PortRange>().expect_err("refused").contains("not a number"));
    }
}
