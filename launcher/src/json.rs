//! Reading and writing `serde_json::Value`s without a panic path. `value["key"]` reads as
//! `Null` where there is nothing, but writing through it panics on a value that is not an
//! object, and the two look alike; these say which they do.

use serde_json::Value;

/// Panic-free access to JSON values.
pub trait JsonExt {
    /// The value at `pointer` (RFC 6901: `/from/version`), `Null` where there is none.
    fn at(&self, pointer: &str) -> &Value;
    /// Sets `key` to `value` when this is an object; anything else is left as it is.
    fn put(&mut self, key: &str, value: impl Into<Value>);
}

/// What [`JsonExt::at`] gives where there is nothing.
static NULL: Value = Value::Null;

impl JsonExt for Value {
    fn at(&self, pointer: &str) -> &Value {
        self.pointer(pointer).unwrap_or(&NULL)
    }

    fn put(&mut self, key: &str, value: impl Into<Value>) {
        if let Some(map) = self.as_object_mut() {
            map.insert(key.to_owned(), value.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_and_writes_never_panic() {
        let mut v = json!({"from": {"version": "7.2.22"}, "list": [1, 2]});
        assert_eq!(v.at("/from/version"), "7.2.22");
        assert_eq!(v.at("/list/1"), 2);
        assert!(v.at("/nothing/here").is_null());
        v.put("result", "ok");
        assert_eq!(v.at("/result"), "ok");
        let mut not_an_object = json!([1]);
        not_an_object.put("x", 1);
        assert_eq!(not_an_object, json!([1]));
    }
}
