//! ONNX graphs as protobuf (`tract_onnx::pb`), below every engine: [`builder`] writes them
//! (our exports and fixtures), [`rewrite`] prepares a graph someone else exported for tract
//! (patterns torch.onnx emits that tract 0.23 cannot analyse or run, replaced by exact
//! equivalents before the graph reaches tract).

pub mod builder;
pub mod rewrite;

use tract_onnx::pb;

const I64: i32 = pb::tensor_proto::DataType::Int64 as i32;
const I32: i32 = pb::tensor_proto::DataType::Int32 as i32;
const F32: i32 = pb::tensor_proto::DataType::Float as i32;
const F64: i32 = pb::tensor_proto::DataType::Double as i32;

/// Pins the symbolic dims of a graph's inputs (`torch.onnx.export(dynamic_axes=…)`'s
/// `batch`, `seq`): `want(input, rank)` says per axis what the runtime will feed (`None`:
/// the graph's own). Every symbol so fixed is replaced by its value in the inputs' and
/// outputs' declared shapes; returns the symbols and their values (onnxruntime's free
/// dimension overrides take the same map). A symbol wanted with two values, or an unnamed
/// symbolic dim, is an error naming the input.
/// A value's tensor type (element type, declared shape), if it is a tensor.
pub fn tensor_type(v: &pb::ValueInfoProto) -> Option<&pb::type_proto::Tensor> {
    match v.r#type.as_ref()?.value.as_ref()? {
        pb::type_proto::Value::TensorType(t) => Some(t),
    }
}

pub fn pin_symbols(
    model: &mut pb::ModelProto,
    want: &dyn Fn(&str, usize) -> Vec<Option<usize>>,
) -> Result<std::collections::BTreeMap<String, usize>, String> {
    use pb::tensor_shape_proto::dimension::Value;
    let mut symbols = std::collections::BTreeMap::new();
    let Some(graph) = model.graph.as_mut() else {
        return Ok(symbols);
    };
    let initializers: std::collections::HashSet<String> =
        graph.initializer.iter().map(|t| t.name.clone()).collect();
    let dims_of = |vi: &pb::ValueInfoProto| -> Option<Vec<Option<Value>>> {
        Some(
            tensor_type(vi)?
                .shape
                .as_ref()?
                .dim
                .iter()
                .map(|d| d.value.clone())
                .collect(),
        )
    };
    for vi in graph
        .input
        .iter()
        .filter(|i| !initializers.contains(&i.name))
    {
        let Some(dims) = dims_of(vi) else { continue };
        let wanted = want(&vi.name, dims.len());
        for (axis, (dim, w)) in dims.iter().zip(&wanted).enumerate() {
            let Some(v) = w else { continue };
            match dim {
                Some(Value::DimValue(_)) => {}
                Some(Value::DimParam(p)) if !p.is_empty() => match symbols.get(p) {
                    Some(old) if old != v => {
                        return Err(format!(
                            "input {} axis {axis}: symbolic dim {p:?} is {old} elsewhere and {v} here",
                            vi.name
                        ));
                    }
                    _ => {
                        symbols.insert(p.clone(), *v);
                    }
                },
                _ => {
                    return Err(format!(
                        "input {} axis {axis} is symbolic without a name: cannot pin it",
                        vi.name
                    ));
                }
            }
        }
    }
    if symbols.is_empty() {
        return Ok(symbols);
    }
    for vi in graph.input.iter_mut().chain(graph.output.iter_mut()) {
        let Some(pb::type_proto::Value::TensorType(t)) =
            vi.r#type.as_mut().and_then(|t| t.value.as_mut())
        else {
            continue;
        };
        for d in t.shape.iter_mut().flat_map(|s| s.dim.iter_mut()) {
            if let Some(Value::DimParam(p)) = &d.value
                && let Some(v) = symbols.get(p)
            {
                d.value = Some(Value::DimValue(*v as i64));
            }
        }
    }
    Ok(symbols)
}

/// An int64 tensor with its values little-endian in `raw_data`, as exporters write them.
pub fn i64_tensor(name: &str, dims: &[i64], values: &[i64]) -> pb::TensorProto {
    debug_assert_eq!(dims.iter().product::<i64>() as usize, values.len());
    pb::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: I64,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

/// The values of an int64 or int32 tensor held in the protobuf (`raw_data` or the typed
/// field), widened to i64; `None` for any other type.
pub fn int_values(t: &pb::TensorProto) -> Option<Vec<i64>> {
    match t.data_type {
        I64 if !t.raw_data.is_empty() => Some(
            t.raw_data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("chunks of 8")))
                .collect(),
        ),
        I64 => Some(t.int64_data.clone()),
        I32 if !t.raw_data.is_empty() => Some(
            t.raw_data
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().expect("chunks of 4")) as i64)
                .collect(),
        ),
        I32 => Some(t.int32_data.iter().map(|v| *v as i64).collect()),
        _ => None,
    }
}

/// The values of a float32 or float64 tensor held in the protobuf (`raw_data` or the typed
/// field), as f64; `None` for any other type or for external data.
pub fn float_values(t: &pb::TensorProto) -> Option<Vec<f64>> {
    match t.data_type {
        F32 if !t.raw_data.is_empty() => Some(
            t.raw_data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("chunks of 4")) as f64)
                .collect(),
        ),
        F32 if t.external_data.is_empty() => Some(t.float_data.iter().map(|v| *v as f64).collect()),
        F64 if !t.raw_data.is_empty() => Some(
            t.raw_data
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("chunks of 8")))
                .collect(),
        ),
        F64 if t.external_data.is_empty() => Some(t.double_data.clone()),
        _ => None,
    }
}

/// Moves every initializer's external data (`location`/`offset`/`length`, the layout
/// torch.onnx and [`builder::write_model`] write) into its `raw_data`, reading the files
/// from `dir`, so a graph compiler sees one self-contained model. A location must be a
/// plain file name in `dir` (never a path out of it) and the range must lie in the file;
/// each file is read once.
pub fn inline_external(model: &mut pb::ModelProto, dir: &std::path::Path) -> Result<(), String> {
    let Some(graph) = model.graph.as_mut() else {
        return Ok(());
    };
    let mut files: std::collections::HashMap<String, Vec<u8>> = std::collections::HashMap::new();
    for t in &mut graph.initializer {
        if t.external_data.is_empty() {
            continue;
        }
        let get = |key: &str| {
            t.external_data
                .iter()
                .find(|e| e.key == key)
                .map(|e| e.value.clone())
        };
        let location = get("location")
            .ok_or_else(|| format!("initializer {}: external data without a location", t.name))?;
        if !crate::contract::plain_file_name(&location) {
            return Err(format!(
                "initializer {}: external data location {location:?} is not a plain file name in the export folder",
                t.name
            ));
        }
        let number = |key: &str| -> Result<Option<usize>, String> {
            get(key)
                .map(|v| {
                    v.parse::<usize>().map_err(|_| {
                        format!(
                            "initializer {}: external {key} {v:?} is not a number",
                            t.name
                        )
                    })
                })
                .transpose()
        };
        let (offset, length) = (number("offset")?.unwrap_or(0), number("length")?);
        if !files.contains_key(&location) {
            let bytes = std::fs::read(dir.join(&location)).map_err(|e| {
                format!(
                    "initializer {}: reading external data {}: {e}",
                    t.name,
                    dir.join(&location).display()
                )
            })?;
            files.insert(location.clone(), bytes);
        }
        let data = &files[&location];
        let end = match length {
            Some(n) => offset.checked_add(n),
            None => Some(data.len()),
        };
        let range = end
            .filter(|&e| offset <= e && e <= data.len())
            .map(|e| offset..e)
            .ok_or_else(|| {
                format!(
                    "initializer {}: external range {offset}+{length:?} lies outside {location} ({} bytes)",
                    t.name,
                    data.len()
                )
            })?;
        t.raw_data = data[range].to_vec();
        t.external_data.clear();
        t.data_location = None;
    }
    Ok(())
}
