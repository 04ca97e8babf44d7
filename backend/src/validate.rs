//! Input checks shared by the handlers. Each error names the field and
//! what is wrong with it, for the 400 body.

use contract::slot::MAX_USER_ID_LEN;

use crate::error::{ApiError, ApiResult};

/// Longest name (first or second), in characters.
pub const MAX_NAME_CHARS: usize = 100;
/// Longest city, in characters.
pub const MAX_CITY_CHARS: usize = 100;
/// Longest biography, in characters.
pub const MAX_BIOGRAPHY_CHARS: usize = 2000;
/// Longest password, in bytes: argon2 takes any length, but a huge one
/// is only a way to burn our CPU.
pub const MAX_PASSWORD_BYTES: usize = 128;
/// Longest post, in characters: the size of a long social post, and it
/// is copied into every broker message of the fan-out.
pub const MAX_POST_CHARS: usize = 5000;
/// Longest dialog message, in characters.
pub const MAX_MESSAGE_CHARS: usize = 4096;

/// A required text: not blank, at most `max` characters.
pub fn text(field: &str, value: &str, max: usize) -> ApiResult<()> {
    if value.trim().is_empty() {
        return Err(ApiError::bad(format!("{field} must not be empty")));
    }
    optional_text(field, value, max)
}

/// An optional text: at most `max` characters, and no control characters
/// but tab and line breaks. PostgreSQL refuses NUL in text (that was a 500),
/// and the others are never meant in a name, a post or a message.
pub fn optional_text(field: &str, value: &str, max: usize) -> ApiResult<()> {
    let n = value.chars().count();
    if n > max {
        return Err(ApiError::bad(format!("{field} is too long: {n} characters, at most {max}")));
    }
    if let Some(c) = value.chars().find(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r')) {
        return Err(ApiError::bad(format!("{field} must not contain control characters (found U+{:04X})", c as u32)));
    }
    Ok(())
}

/// A user or post id from a path or body: 1 to 64 bytes of
/// `[A-Za-z0-9._-]` (SPEC), so nothing else reaches a query or a key.
pub fn id(field: &str, value: &str) -> ApiResult<()> {
    if value.is_empty() || value.len() > MAX_USER_ID_LEN {
        return Err(ApiError::bad(format!("{field} must be 1 to {MAX_USER_ID_LEN} bytes")));
    }
    if !value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return Err(ApiError::bad(format!("{field} must be made of A-Z, a-z, 0-9, '.', '_' and '-'")));
    }
    Ok(())
}

pub fn password(value: &str) -> ApiResult<()> {
    if value.is_empty() {
        return Err(ApiError::bad("password must not be empty"));
    }
    if value.len() > MAX_PASSWORD_BYTES {
        return Err(ApiError::bad(format!("password is too long: at most {MAX_PASSWORD_BYTES} bytes")));
    }
    Ok(())
}

/// A calendar date `YYYY-MM-DD` between 1900-01-01 and 2100-12-31.
pub fn date(field: &str, value: &str) -> ApiResult<()> {
    let bad = || ApiError::bad(format!("{field} must be a date YYYY-MM-DD, got {value:?}"));
    let b = value.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return Err(bad());
    }
    let num = |s: &str| s.bytes().all(|c| c.is_ascii_digit()).then(|| s.parse::<u32>().ok()).flatten();
    let (Some(y), Some(m), Some(d)) = (num(&value[0..4]), num(&value[5..7]), num(&value[8..10])) else {
        return Err(bad());
    };
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return Err(bad()),
    };
    if !(1900..=2100).contains(&y) || d == 0 || d > days {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        for ok in ["2000-02-29", "1990-12-31", "1900-01-01"] {
            assert!(date("d", ok).is_ok(), "{ok}");
        }
        for bad in ["1900-02-29", "2023-02-30", "2023-13-01", "2023-1-01", "abcd-ef-gh", "", "2023-04-31", "+023-01-01"]
        {
            assert!(date("d", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn texts() {
        assert!(text("t", "  ", 10).is_err());
        assert!(text("t", "ёжик", 4).is_ok());
        let e = text("t", "ёжики", 4).unwrap_err().to_string();
        assert!(e.contains("too long"), "{e}");
        let e = text("name", "a\0b", 10).unwrap_err().to_string();
        assert!(e.contains("name") && e.contains("U+0000"), "{e}");
        assert!(text("t", "two\nlines\tand a tab\r\n", 100).is_ok());
        assert!(id("id", "0190-abc_DEF.x").is_ok());
        for bad in ["a b", "a\0", "a/b", "é", ""] {
            assert!(id("id", bad).is_err(), "{bad:?}");
        }
    }
}
