//! The `cpu` engine: the export's ONNX graphs run by tract, pure Rust.
//!
//! Graphs are loaded, prepared for tract ([`crate::onnx::rewrite::prepare`]),
//! shape-fixed (the export declares concrete shapes), optimised and planned once
//! at start; a call only spawns a run state. One call uses one thread:
//! parallelism comes from the server's worker pool.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::{Engine, EngineError, Shapes};

/// A graph optimised and planned for tract, ready to run.
pub type Plan = Arc<TypedSimplePlan>;

pub struct CpuEngine {
    prefix: Plan,
    expert: Plan,
    shapes: Shapes,
}

/// Loads one ONNX graph: reads the protobuf, rewrites what tract cannot run
/// ([`crate::onnx::rewrite::prepare`], logged), parses it with its folder (where
/// external `*.data` files are resolved), optimises and plans it. Errors name the file
/// (and the node, for a pattern that cannot be rewritten).
pub fn load_graph(path: &Path) -> Result<Plan, EngineError> {
    load_graph_with(path, |_| ()).map(|(plan, ())| plan)
}

/// [`load_graph`], with a look at the prepared protobuf before tract takes it (what tract
/// does not keep: external data files, initializer shapes).
pub fn load_graph_with<T>(
    path: &Path,
    inspect: impl FnOnce(&tract_onnx::pb::ModelProto) -> T,
) -> Result<(Plan, T), EngineError> {
    load_graph_edit(path, |proto| Ok(inspect(proto)))
}

/// [`load_graph_with`] whose hook may also change the protobuf before tract parses it (pin
/// symbolic input dims: [`crate::onnx::pin_symbols`]); its error names the graph.
pub fn load_graph_edit<T>(
    path: &Path,
    edit: impl FnOnce(&mut tract_onnx::pb::ModelProto) -> Result<T, String>,
) -> Result<(Plan, T), EngineError> {
    let err = |message: String| EngineError::Load {
        graph: path.display().to_string(),
        message,
    };
    let tract_err = |e: TractError| err(format!("{e:#}"));
    let onnx = tract_onnx::onnx();
    let mut proto = onnx.proto_model_for_path(path).map_err(tract_err)?;
    let report = crate::onnx::rewrite::prepare(&mut proto).map_err(|e| err(e.to_string()))?;
    if !report.is_empty() {
        tracing::info!(
            graph = %path.display(),
            sequence_items = report.sequence_items,
            cumsums = report.cumsums,
            powers = report.powers,
            "graph rewritten for tract"
        );
    }
    let seen = edit(&mut proto).map_err(err)?;
    let dir = path.parent().and_then(Path::to_str);
    let parsed = onnx.parse(&proto, dir).map_err(tract_err)?;
    if !parsed.unresolved_inputs.is_empty() {
        return Err(err(format!(
            "inputs no node produces: {:?}",
            parsed.unresolved_inputs
        )));
    }
    let mut typed = parsed.model.into_typed().map_err(tract_err)?;
    materialize_broadcasts_into_concat(&mut typed);
    let plan = typed
        .into_optimized()
        .map_err(tract_err)?
        .into_runnable()
        .map_err(tract_err)?;
    Ok((plan, seen))
}

/// tract 0.23.9's EinSum declutter (`declutter_broadcast`) absorbs a `MultiBroadcastTo`
/// input even when the broadcast axis exists in no other input, and the einsum's output
/// shrinks (an `Expand`ed time embedding concatenated with the action tokens before a
/// Linear, as SmolVLA's expert does: "Trying to substitute a 50,32,F32 by 1,32,F32"). A
/// broadcast that feeds a `Concat` is made a [`Materialize`] (the same values, computed), which
/// no declutter rule sees through.
fn materialize_broadcasts_into_concat(model: &mut TypedModel) {
    use tract_onnx::tract_core::ops::array::{MultiBroadcastTo, TypedConcat};
    let ids: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|n| {
            n.op_is::<MultiBroadcastTo>()
                && n.outputs[0]
                    .successors
                    .iter()
                    .any(|s| model.node(s.node).op_is::<TypedConcat>())
        })
        .map(|n| n.id)
        .collect();
    for id in ids {
        let node = model.node_mut(id);
        let shape = node
            .op_as::<MultiBroadcastTo>()
            .expect("filtered")
            .shape
            .clone();
        node.op = Box::new(Materialize { shape });
    }
}

/// `MultiBroadcastTo`, evaluated as such, opaque to tract's declutter rules (see
/// [`materialize_broadcasts_into_concat`]).
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct Materialize {
    shape: ShapeFact,
}

impl Op for Materialize {
    fn name(&self) -> StaticName {
        "reflex.Materialize".into()
    }

    op_as_typed_op!();
}

impl EvalOp for Materialize {
    op_out_of_plan!();

    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let shape = self.shape.eval_to_usize(ctx.symbols)?;
        Ok(tvec!(inputs[0].broadcast_to_shape(&shape)?.into_tvalue()))
    }
}

impl TypedOp for Materialize {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(inputs[0].datum_type.fact(self.shape.clone())))
    }

    as_op!();
}

fn run_err(graph: &'static str) -> impl Fn(TractError) -> EngineError {
    move |e| EngineError::Run {
        graph,
        message: format!("{e:#}"),
    }
}

fn tensor<T: Datum + Copy>(shape: &[usize], data: &[T]) -> TractResult<TValue> {
    Ok(Tensor::from_shape(shape, data)?.into_tvalue())
}

impl CpuEngine {
    pub fn load(prefix: &Path, expert: &Path, shapes: Shapes) -> Result<Self, EngineError> {
        Ok(CpuEngine {
            prefix: load_graph(prefix)?,
            expert: load_graph(expert)?,
            shapes,
        })
    }

    fn expert_inputs(
        &self,
        x: &[f32],
        t: f32,
        prefix: &[f32],
        state: &[f32],
    ) -> TractResult<TVec<TValue>> {
        let s = &self.shapes;
        Ok(tvec![
            tensor(&[1, s.chunk, s.action_dim], x)?,
            tensor(&[1, 1], &[t])?,
            tensor(&[1, s.prefix_dim], prefix)?,
            tensor(&[1, s.state_dim], state)?,
        ])
    }
}

fn first_output(out: TVec<TValue>) -> TractResult<Vec<f32>> {
    Ok(out[0].try_as_plain_ram()?.as_slice::<f32>()?.to_vec())
}

impl Engine for CpuEngine {
    fn mode(&self) -> &'static str {
        "cpu"
    }

    fn hardware(&self) -> BTreeMap<String, String> {
        let mut m = super::cpu_hardware();
        m.insert("engine".into(), "tract".into());
        m
    }

    fn prefix(&self, pixels: &[f32], tokens: &[i64]) -> Result<Vec<f32>, EngineError> {
        let s = &self.shapes;
        let run = || -> TractResult<Vec<f32>> {
            let inputs = tvec![
                tensor(&[s.cameras, 3, s.height, s.width], pixels)?,
                tensor(&[1, s.tokens], tokens)?,
            ];
            first_output(self.prefix.run(inputs)?)
        };
        run().map_err(run_err("prefix"))
    }

    fn expert_step(
        &self,
        x: &[f32],
        t: f32,
        prefix: &[f32],
        state: &[f32],
    ) -> Result<Vec<f32>, EngineError> {
        let run = || first_output(self.expert.run(self.expert_inputs(x, t, prefix, state)?)?);
        run().map_err(run_err("expert"))
    }

    fn denoise(
        &self,
        noise: Vec<f32>,
        prefix: &[f32],
        state: &[f32],
        steps: u32,
    ) -> Result<Vec<f32>, EngineError> {
        // One run state for the whole loop: tract reuses its buffers between steps.
        let mut run_state = self.expert.spawn().map_err(run_err("expert"))?;
        super::euler(noise, steps, |x, t| {
            let inputs = self
                .expert_inputs(x, t, prefix, state)
                .map_err(run_err("expert"))?;
            run_state
                .run(inputs)
                .and_then(first_output)
                .map_err(run_err("expert"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::{F32, GraphBuilder, int, write_model};

    #[test]
    fn a_graph_that_cannot_be_prepared_fails_naming_the_file_and_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = GraphBuilder::new("concat_from_sequence");
        let x = g.input("x", F32, &[4, 3]);
        let seq = g.node("SplitToSequence", &[&x], vec![int("axis", 0)]);
        let y = g.node("ConcatFromSequence", &[&seq], vec![int("axis", 0)]);
        g.output(&y, "y", F32, &[4, 3]);
        write_model(dir.path(), "bad.onnx", g.model(19), None).unwrap();
        let err = load_graph(&dir.path().join("bad.onnx"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.onnx"), "{err}");
        assert!(err.contains("ConcatFromSequence:"), "{err}");
    }
}
