//! Config text to [`Config`]: read the file, deserialize the YAML into
//! [`FileConfig`] (serde errors keep their field path), then resolve it.

use std::path::Path;

use super::resolve::resolve;
use super::{Config, ConfigError, ConfigErrors, FileConfig};

/// Reads and validates a config file. Relative paths inside it (certs, CA
/// files, state dir) are resolved against the file's directory.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        origin: origin.clone(),
        errors: vec![ConfigError {
            path: ".".into(),
            message: format!("cannot read the file: {e}"),
        }],
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, &origin, base)
}

/// Parses and validates config text; `base` resolves relative paths.
pub fn parse(text: &str, origin: &str, base: &Path) -> Result<Config, ConfigErrors> {
    let fail = |errors| ConfigErrors {
        origin: origin.to_owned(),
        errors,
    };
    let de = serde_yaml::Deserializer::from_str(text);
    let file: FileConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = explain_serde(&path, &inner.to_string());
        fail(vec![ConfigError { path, message }])
    })?;
    resolve(file, base).map_err(fail)
}

/// serde_yaml prefixes its message with the part of the path it knows,
/// which we already print; and its "missing field" deserves the fix.
fn explain_serde(path: &str, msg: &str) -> String {
    let mut msg = msg;
    let mut prefixes = vec![path.to_owned()];
    if let Some((parent, _)) = path.rsplit_once('.') {
        prefixes.push(parent.to_owned());
    }
    for p in prefixes {
        if let Some(rest) = msg.strip_prefix(&format!("{p}: ")) {
            msg = rest;
            break;
        }
    }
    if msg.starts_with("missing field") {
        format!("{msg} (this field is required)")
    } else {
        msg.to_owned()
    }
}
