//! A set of ports as a bitmap (8 KiB for all 65,536): which port slots the writer has routed,
//! so a pass over the table's routes visits those slots and not every port slot.

/// Ports, one bit each.
#[derive(Clone)]
pub(crate) struct PortSet(Box<[u64; 1024]>);

impl PortSet {
    pub(crate) fn new() -> PortSet {
        PortSet(Box::new([0; 1024]))
    }

    pub(crate) fn insert(&mut self, port: u16) {
        self.0[usize::from(port / 64)] |= 1 << (port % 64);
    }

    pub(crate) fn remove(&mut self, port: u16) {
        self.0[usize::from(port / 64)] &= !(1 << (port % 64));
    }

    /// The ports in ascending order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.0.iter().enumerate().flat_map(|(i, &word)| {
            let mut w = word;
            std::iter::from_fn(move || {
                (w != 0).then(|| {
                    let bit = w.trailing_zeros();
                    w &= w - 1;
                    // i < 1024 and bit < 64: the port fits in a u16.
                    (i * 64 + bit as usize) as u16
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_exactly_what_was_inserted_and_not_removed() {
        let mut s = PortSet::new();
        for p in [0, 1, 63, 64, 20_000, 65_535, 20_000] {
            s.insert(p);
        }
        s.remove(1);
        s.remove(7);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 63, 64, 20_000, 65_535]);
        assert_eq!(PortSet::new().iter().count(), 0);
    }
}
