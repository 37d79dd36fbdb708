//! The layout version of the pinned maps: pins made by another version of
//! the program, or whose maps are defined differently from this program's
//! (type, key and value sizes, capacity, flags), are never reused. They are
//! unpinned (the program still attached keeps them until a new one replaces
//! it in its link) and the loader creates fresh maps.

use std::path::Path;

use aya::maps::{Array, Map, MapData, MapInfo};
use jit_gate_common::{LAYOUT_VERSION, maps::names};

use super::{
    GateOptions, LINK_PIN_PREFIX, PROGRAM_PIN, Result, map_err, pin_names, remove_if_exists,
};

/// Unpins the maps under `pin_dir` unless they were made for this layout
/// and match the maps `object` defines (with `options` applied); returns
/// why they were unpinned, or `None` if they are reused or there are none.
pub(super) fn retire_stale(
    pin_dir: &Path,
    object: &[u8],
    options: &GateOptions,
) -> Result<Option<String>> {
    let pinned = map_pins(pin_dir)?;
    if pinned.is_empty() {
        return Ok(None);
    }
    let Some(reason) = mismatch(pin_dir, &pinned, object, options)? else {
        return Ok(None);
    };
    for name in &pinned {
        remove_if_exists(&pin_dir.join(name))?;
    }
    Ok(Some(reason))
}

/// Why the pinned maps cannot be reused, if they cannot.
fn mismatch(
    pin_dir: &Path,
    pinned: &[String],
    object: &[u8],
    options: &GateOptions,
) -> Result<Option<String>> {
    match pinned_version(pin_dir) {
        None => return Ok(Some("the pins carry no layout version".into())),
        Some(version) if version != LAYOUT_VERSION => {
            return Ok(Some(format!(
                "the pins are of layout version {version}, this program of {LAYOUT_VERSION}"
            )));
        }
        Some(_) => {}
    }
    let object = aya_obj::Object::parse(object).map_err(Box::new)?;
    for name in pinned {
        let Some(expected) = object.maps.get(name.as_str()) else {
            return Ok(Some(format!("map {name} is not one of this program's")));
        };
        let info = MapInfo::from_pin(pin_dir.join(name)).map_err(map_err(names::LAYOUT))?;
        let max_entries = if name == names::FLOWS {
            options.flow_capacity
        } else {
            expected.max_entries()
        };
        let map_type = info.map_type().map_err(map_err(names::LAYOUT))? as u32;
        let found = (
            map_type,
            info.key_size(),
            info.value_size(),
            info.max_entries(),
            info.map_flags(),
        );
        let wanted = (
            expected.map_type(),
            expected.key_size(),
            expected.value_size(),
            max_entries,
            expected.map_flags(),
        );
        if found != wanted {
            return Ok(Some(format!(
                "map {name} is defined as (type, key size, value size, entries, flags) \
                 {found:?}, this program wants {wanted:?}"
            )));
        }
    }
    Ok(None)
}

/// The version stamped in the pinned `LAYOUT` map, if there is one.
fn pinned_version(pin_dir: &Path) -> Option<u32> {
    let data = MapData::from_pin(pin_dir.join(names::LAYOUT)).ok()?;
    let layout: Array<MapData, u32> = Map::from_map_data(data).ok()?.try_into().ok()?;
    layout.get(&0, 0).ok()
}

/// Stamps the maps with this program's layout version.
pub(super) fn stamp(layout: &mut Array<MapData, u32>) -> Result<()> {
    layout
        .set(0, LAYOUT_VERSION, 0)
        .map_err(map_err(names::LAYOUT))
}

/// Removes every map pin under `pin_dir`, of this layout or another.
pub(super) fn remove_map_pins(pin_dir: &Path) -> Result<()> {
    for name in map_pins(pin_dir)? {
        remove_if_exists(&pin_dir.join(name))?;
    }
    Ok(())
}

/// The pins under `pin_dir` that are neither the program nor a link: the
/// maps, of whatever layout.
fn map_pins(pin_dir: &Path) -> Result<Vec<String>> {
    Ok(pin_names(pin_dir)?
        .into_iter()
        .filter(|n| n != PROGRAM_PIN && !n.starts_with(LINK_PIN_PREFIX))
        .collect())
}
