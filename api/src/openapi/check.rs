//! A strict check of a JSON value against a schema of the document, for the tests: the
//! subset of JSON Schema that utoipa writes (`$ref`, `allOf`, `oneOf`, `type`, `enum`,
//! `properties`, `required`, `additionalProperties`, `items`, bounds, `uuid` and
//! `date-time` formats).
//!
//! Stricter than JSON Schema in one way, on purpose: with `exact`, an object must hold
//! every property its schema declares (optional ones as `null`), so that a field that the
//! document declares but the server no longer writes is caught as surely as one the server
//! writes but the document does not declare.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// The object part of a schema, merged over its `allOf` members and references.
#[derive(Debug, Default)]
struct Shape<'a> {
    properties: BTreeMap<&'a str, &'a Value>,
    required: BTreeSet<&'a str>,
    /// `None`: no other key allowed; `Some(schema)`: any other key, of this schema.
    additional: Option<&'a Value>,
}

/// Follows `$ref`s within `document`.
fn resolve<'a>(document: &'a Value, mut schema: &'a Value) -> Result<&'a Value, String> {
    for _ in 0..32 {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(target) => {
                schema = target
                    .strip_prefix('#')
                    .and_then(|pointer| document.pointer(pointer))
                    .ok_or_else(|| format!("{target} does not resolve"))?;
            }
            None => return Ok(schema),
        }
    }
    Err("a cycle of $refs".to_owned())
}

/// Merges the object schema `schema` (and its `allOf` members) into `shape`.
fn merge<'a>(document: &'a Value, schema: &'a Value, shape: &mut Shape<'a>) -> Result<(), String> {
    let schema = resolve(document, schema)?;
    if let Some(members) = schema.get("allOf").and_then(Value::as_array) {
        for member in members {
            merge(document, member, shape)?;
        }
    }
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        shape.properties.extend(
            properties
                .iter()
                .map(|(name, schema)| (name.as_str(), schema)),
        );
    }
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        shape
            .required
            .extend(required.iter().filter_map(Value::as_str));
    }
    match schema.get("additionalProperties") {
        Some(Value::Bool(false)) | None => {}
        Some(Value::Bool(true)) => shape.additional = Some(&Value::Bool(true)),
        Some(other) => shape.additional = Some(other),
    }
    Ok(())
}

fn type_matches(name: &str, value: &Value) -> bool {
    match name {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "string" => value.is_string(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        _ => false,
    }
}

/// Checks `value` against `schema` (a schema of `document`); `at` names the place for the
/// error message.
///
/// # Errors
/// The first mismatch found.
pub fn check(
    document: &Value,
    schema: &Value,
    value: &Value,
    at: &str,
    exact: bool,
) -> Result<(), String> {
    let schema = resolve(document, schema)?;
    if let Some(branches) = schema.get("oneOf").and_then(Value::as_array) {
        let results: Vec<Result<(), String>> = branches
            .iter()
            .map(|branch| check(document, branch, value, at, exact))
            .collect();
        let matching = results.iter().filter(|r| r.is_ok()).count();
        return match matching {
            1 => Ok(()),
            0 => Err(format!(
                "{at}: {value} matches no branch of oneOf: {:?}",
                results
                    .into_iter()
                    .filter_map(Result::err)
                    .collect::<Vec<_>>()
            )),
            n => Err(format!("{at}: {value} matches {n} branches of oneOf")),
        };
    }
    if let Some(types) = schema.get("type") {
        let names: Vec<&str> = match types {
            Value::String(name) => vec![name.as_str()],
            Value::Array(names) => names.iter().filter_map(Value::as_str).collect(),
            _ => return Err(format!("{at}: a schema type that is neither text nor list")),
        };
        if !names.iter().any(|name| type_matches(name, value)) {
            return Err(format!("{at}: {value} is not of type {types}"));
        }
    }
    if value.is_null() {
        // Allowed by `type` above; without a `type`, only by a schema that is not an object's.
        let object = schema.get("allOf").is_some() || schema.get("properties").is_some();
        return match (schema.get("type"), object) {
            (None, true) => Err(format!("{at}: null is not an object")),
            _ => Ok(()),
        };
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        return Err(format!("{at}: {value} is not one of {allowed:?}"));
    }
    if let Some(number) = value.as_f64() {
        if let Some(minimum) = schema.get("minimum").and_then(Value::as_f64)
            && number < minimum
        {
            return Err(format!("{at}: {number} is below the minimum {minimum}"));
        }
        if let Some(maximum) = schema.get("maximum").and_then(Value::as_f64)
            && number > maximum
        {
            return Err(format!("{at}: {number} is above the maximum {maximum}"));
        }
    }
    if let Some(text) = value.as_str() {
        match schema.get("format").and_then(Value::as_str) {
            Some("uuid") if uuid::Uuid::try_parse(text).is_err() => {
                return Err(format!("{at}: {text:?} is not a UUID"));
            }
            Some("date-time") if chrono::DateTime::parse_from_rfc3339(text).is_err() => {
                return Err(format!("{at}: {text:?} is not an RFC 3339 time"));
            }
            _ => {}
        }
    }
    if let Some(items) = value.as_array() {
        let count = items.len() as u64;
        if schema
            .get("minItems")
            .and_then(Value::as_u64)
            .is_some_and(|min| count < min)
            || schema
                .get("maxItems")
                .and_then(Value::as_u64)
                .is_some_and(|max| count > max)
        {
            return Err(format!("{at}: {count} items is out of bounds"));
        }
        if let Some(item) = schema.get("items") {
            for (index, value) in items.iter().enumerate() {
                check(document, item, value, &format!("{at}[{index}]"), exact)?;
            }
        }
    }
    if let Some(object) = value.as_object() {
        let mut shape = Shape::default();
        merge(document, schema, &mut shape)?;
        let declares_object = !shape.properties.is_empty()
            || shape.additional.is_some()
            || schema.get("allOf").is_some();
        if !declares_object {
            // A free-form object (`{"type": "object"}`).
            return Ok(());
        }
        for name in &shape.required {
            if !object.contains_key(*name) {
                return Err(format!("{at}: the required {name:?} is missing"));
            }
        }
        if exact {
            for name in shape.properties.keys() {
                if !object.contains_key(*name) {
                    return Err(format!("{at}: the declared {name:?} is not written"));
                }
            }
        }
        for (name, value) in object {
            let place = format!("{at}.{name}");
            match (shape.properties.get(name.as_str()), shape.additional) {
                (Some(property), _) => check(document, property, value, &place, exact)?,
                (None, Some(Value::Bool(true))) => {}
                (None, Some(additional)) => check(document, additional, value, &place, exact)?,
                (None, None) => return Err(format!("{place} is not in the schema")),
            }
        }
    }
    Ok(())
}

/// Checks `value` against the component schema `name`.
///
/// # Errors
/// The first mismatch found.
pub fn check_component(document: &Value, name: &str, value: &Value) -> Result<(), String> {
    let schema = serde_json::json!({ "$ref": format!("#/components/schemas/{name}") });
    check(document, &schema, value, name, true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The check itself fails where it must: a missing, extra, ill-typed or out-of-range
    /// field, in a referenced, merged or nullable schema.
    #[test]
    fn the_check_catches_each_kind_of_mismatch() {
        let document = json!({"components": {"schemas": {
            "Inner": {"type": "object", "required": ["n"], "properties": {
                "n": {"type": "integer", "minimum": 1, "maximum": 5},
                "s": {"type": ["string", "null"], "format": "uuid"}
            }},
            "Outer": {"allOf": [
                {"$ref": "#/components/schemas/Inner"},
                {"type": "object", "required": ["kind"], "properties": {
                    "kind": {"type": "string", "enum": ["a", "b"]},
                    "more": {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/Inner"}]}
                }}
            ]}
        }}});
        let good = json!({"n": 3, "s": null, "kind": "a", "more": {"n": 1, "s": null}});
        assert_eq!(check_component(&document, "Outer", &good), Ok(()));
        assert!(check_component(&document, "Outer", &Value::Null).is_err());
        let bad = [
            json!({"n": 3, "s": null, "kind": "a"}),
            json!({"n": 3, "s": null, "kind": "a", "more": null, "extra": 1}),
            json!({"n": 3.5, "s": null, "kind": "a", "more": null}),
            json!({"n": 9, "s": null, "kind": "a", "more": null}),
            json!({"n": 3, "s": "x", "kind": "a", "more": null}),
            json!({"n": 3, "s": null, "kind": "c", "more": null}),
            json!({"n": 3, "s": null, "kind": "a", "more": {"s": null}}),
        ];
        for value in bad {
            assert!(
                check_component(&document, "Outer", &value).is_err(),
                "{value} passed"
            );
        }
    }
}
