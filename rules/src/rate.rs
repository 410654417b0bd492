//! `N/period` rates, as written in the rules and shaping data and in mock-ISP scenarios.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

/// At most `count` events per `per`. Written `"100/s"`, `"600/min"`, `"3/h"`, `"10/5s"` (the
/// period is a humantime duration; a bare unit means one of it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    pub fn new(count: u32, per: Duration) -> Option<Rate> {
        (count > 0 && !per.is_zero()).then_some(Rate { count, per })
    }

    /// Events per second.
    pub fn per_second(&self) -> f64 {
        f64::from(self.count) / self.per.as_secs_f64()
    }

    /// The time between two events at this rate (at least 1 ns).
    pub fn interval(&self) -> Duration {
        (self.per / self.count).max(Duration::from_nanos(1))
    }

    /// The slower of two rates.
    pub fn min(self, other: Rate) -> Rate {
        if other.per_second() < self.per_second() {
            other
        } else {
            self
        }
    }
}

impl FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (count, per) = s.split_once('/').ok_or_else(|| format!("rate {s:?}: expected N/period, e.g. \"100/s\""))?;
        let count: u32 = count.trim().parse().map_err(|_| format!("rate {s:?}: {count:?} is not a whole number"))?;
        let per = per.trim();
        let period = humantime::parse_duration(per)
            .or_else(|_| humantime::parse_duration(&format!("1{per}")))
            .map_err(|_| format!("rate {s:?}: {per:?} is not a period like s, min, h or 10s"))?;
        Rate::new(count, period).ok_or_else(|| format!("rate {s:?}: the count and the period must be more than zero"))
    }
}

impl TryFrom<String> for Rate {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per.as_secs() {
            1 if self.per.subsec_nanos() == 0 => Some("s"),
            60 if self.per.subsec_nanos() == 0 => Some("min"),
            3600 if self.per.subsec_nanos() == 0 => Some("h"),
            _ => None,
        };
        match unit {
            Some(u) => write!(f, "{}/{u}", self.count),
            None => write!(f, "{}/{}", self.count, humantime::format_duration(self.per)),
        }
    }
}

impl serde::Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_in_several_spellings_and_print_back() {
        let r: Rate = "100/s".parse().unwrap();
        assert_eq!((r.count, r.per), (100, Duration::from_secs(1)));
        assert_eq!("600/min".parse::<Rate>().unwrap().per, Duration::from_secs(60));
        assert_eq!("3/h".parse::<Rate>().unwrap().per, Duration::from_secs(3600));
        assert_eq!("10/5s".parse::<Rate>().unwrap().per, Duration::from_secs(5));
        for bad in ["100", "0/s", "x/s", "5/fortnight", "5/0s"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad} should not parse");
        }
        for s in ["100/s", "600/min", "3/h", "10/5s"] {
            assert_eq!(s.parse::<Rate>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn arithmetic() {
        let r: Rate = "3000/min".parse().unwrap();
        assert_eq!(r.per_second(), 50.0);
        assert_eq!(r.interval(), Duration::from_millis(20));
        assert_eq!(r.min("10/s".parse().unwrap()).to_string(), "10/s");
    }
}
