//! The public schema of integration events (`docs/integration-events.schema.json`), for the
//! tests that check every event they receive against it.

use std::sync::OnceLock;

use serde_json::Value;

const SCHEMA: &str = include_str!("../../../docs/integration-events.schema.json");

/// Checks `event` (a CloudEvents document as received) against the public schema, with
/// formats (`uuid`, `date-time`) asserted: every way it fails, or `Ok`.
pub fn check_integration_event(event: &Value) -> Result<(), String> {
    static VALIDATOR: OnceLock<Result<jsonschema::Validator, String>> = OnceLock::new();
    let validator = VALIDATOR
        .get_or_init(|| {
            let schema: Value = serde_json::from_str(SCHEMA).map_err(|error| error.to_string())?;
            jsonschema::draft202012::options()
                .should_validate_formats(true)
                .build(&schema)
                .map_err(|error| format!("the schema itself is invalid: {error}"))
        })
        .as_ref()?;
    let errors: Vec<String> = validator
        .iter_errors(event)
        .map(|error| format!("{} at {}", error, error.instance_path))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{event} does not match the schema: {}",
            errors.join("; ")
        ))
    }
}
