//! Rendering a chat template in bounded memory.
//!
//! minijinja's fuel bounds the number of instructions a template runs, its
//! recursion limit the nesting, but not the size of the values those
//! instructions make: `{% set s = s ~ s %}` in a loop of 60 doubles a string
//! 60 times in about 300 units of fuel. So every place a template can make a
//! new value or output from its own values is charged, *before* the value is
//! made, against one byte budget per render ([`Budget`]):
//!
//! * the operators that build values from values, `~`, `+`, `*` and slicing,
//!   are compiled into calls of checked functions (the instructions
//!   `StringConcat`, `Add`, `Mul` and `Slice` are replaced one for one by
//!   `CallFunction`s of the same arity); sequences joined by `+` or repeated
//!   by `*` are materialized (minijinja keeps them lazy, whose length can
//!   double per instruction at no memory cost and explode in any later
//!   display or filter);
//! * every filter and every Python string method (pycompat) is charged an
//!   upper bound of its result computed from its arguments (widths, counts,
//!   separators, escaping factors) before it runs;
//! * all output, including what `{% set x %}…{% endset %}`, macros and
//!   `{% filter %}` capture, passes through the formatter, which charges the
//!   value's display size first; template text (`EmitRaw`) is compiled into
//!   a constant that is emitted through the formatter too;
//! * constant folding at compile time (`'x' * 100000000 ~ …` is evaluated by
//!   minijinja's code generator before anything runs) is bounded by a check
//!   of the parsed template (`folding::check_constant_folding`);
//! * `debug()`, which formats the whole state, is not available.
//!
//! The budget is cumulative (bytes ever made, not bytes alive), so it also
//! bounds the time spent copying. Display sizes are computed by a walk that
//! stops at the remaining budget or at a nesting depth of [`MAX_DEPTH`], so
//! a value shared many times inside itself (`[l, l]` nested 60 deep) is
//! refused instead of formatted.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use minijinja::machinery::{self, ast, Instruction, Instructions};
use minijinja::value::{Rest, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Expression, State};

mod filters;
mod folding;

use filters::{digit_sum, install_filters};
pub(crate) use folding::precheck;

/// Nesting depth of a value (lists in lists, maps in lists, …) beyond which
/// it is refused rather than displayed.
pub const MAX_DEPTH: usize = 64;

/// Bytes that constant folding at compile time may make in all.
pub const CONST_FOLD_LIMIT: u128 = 1 << 20;

/// Cumulative byte budget of one render.
pub(crate) struct Budget {
    limit: usize,
    used: AtomicUsize,
    exceeded: AtomicBool,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            used: AtomicUsize::new(0),
            exceeded: AtomicBool::new(false),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether a render failed because it would have exceeded the budget.
    pub fn exceeded(&self) -> bool {
        self.exceeded.load(Ordering::Relaxed)
    }

    fn remaining(&self) -> usize {
        self.limit.saturating_sub(self.used.load(Ordering::Relaxed))
    }

    fn refuse(&self) -> Error {
        self.exceeded.store(true, Ordering::Relaxed);
        Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "the template would make more than {} bytes of values and output",
                self.limit
            ),
        )
    }

    /// Charge `n` bytes (saturating) or fail.
    fn charge(&self, n: u128) -> Result<(), Error> {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        let used = self.used.load(Ordering::Relaxed).saturating_add(n);
        if used > self.limit {
            return Err(self.refuse());
        }
        self.used.store(used, Ordering::Relaxed);
        Ok(())
    }

    /// Display size of `v` (see [`size_of`]), or the budget error when it
    /// exceeds what is left.
    fn size(&self, v: &Value) -> Result<Size, Error> {
        size_of(v, self.remaining()).ok_or_else(|| self.refuse())
    }

    /// Total display size of `vals`.
    fn sizes(&self, vals: &[Value]) -> Result<Size, Error> {
        let mut t = Size::default();
        for v in vals {
            let s = self.size(v)?;
            t.bytes = t.bytes.saturating_add(s.bytes);
            t.items = t.items.saturating_add(s.items);
            t.depth = t.depth.max(s.depth);
        }
        Ok(t)
    }
}

/// An upper bound of what displaying (or serializing, escaped) a value makes.
#[derive(Debug, Default, Clone, Copy)]
struct Size {
    /// Bytes of its display (strings inside containers counted as escaped).
    bytes: u128,
    /// Items of all containers.
    items: u128,
    /// Container nesting.
    depth: u128,
}

/// The display size of `v`, or `None` past `cap` bytes or [`MAX_DEPTH`]
/// levels. Walks at most `cap` bytes' worth of items.
fn size_of(v: &Value, cap: usize) -> Option<Size> {
    fn walk(v: &Value, inner: bool, depth: usize, s: &mut Size, cap: u128) -> bool {
        let n: u128 = match v.kind() {
            ValueKind::Undefined => 0,
            ValueKind::None | ValueKind::Bool => 5,
            ValueKind::Number => 32,
            ValueKind::String => {
                let l = v.as_str().map_or(0, str::len) as u128;
                // inside a container it is shown quoted and escaped (≤ 6 bytes per byte)
                if inner {
                    6 * l + 2
                } else {
                    l
                }
            }
            ValueKind::Bytes => v.as_bytes().map_or(0, |b| 4 * b.len() as u128 + 3),
            ValueKind::Seq | ValueKind::Iterable | ValueKind::Map => {
                if depth >= MAX_DEPTH {
                    return false;
                }
                s.depth = s.depth.max(depth as u128 + 1);
                s.bytes += 2;
                let is_map = v.kind() == ValueKind::Map;
                if let Ok(it) = v.try_iter() {
                    for item in it {
                        s.items += 1;
                        s.bytes += 2;
                        if s.bytes > cap || !walk(&item, true, depth + 1, s, cap) {
                            return false;
                        }
                        if is_map {
                            let val = v.get_item(&item).unwrap_or_default();
                            s.bytes += 2;
                            if !walk(&val, true, depth + 1, s, cap) {
                                return false;
                            }
                        }
                    }
                }
                0
            }
            // macros, loop objects, namespaces shown as a short tag
            _ => 64,
        };
        s.bytes = s.bytes.saturating_add(n);
        s.bytes <= cap
    }
    let mut s = Size::default();
    walk(v, false, 0, &mut s, cap as u128).then_some(s)
}

/// The names the rewritten instructions call.
const CONCAT: &str = "__qlora_concat";
const ADD: &str = "__qlora_add";
const MUL: &str = "__qlora_mul";
const SLICE: &str = "__qlora_slice";

/// `instructions` with `~`, `+`, `*` and slicing calling the checked
/// functions and template text emitted through the formatter, jump targets
/// and source locations kept.
pub(crate) fn rewrite<'s>(old: &Instructions<'s>) -> Instructions<'s> {
    // new index of every old instruction (one past the end included)
    let mut at = Vec::with_capacity(old.len() + 1);
    let mut n = 0u32;
    for i in 0..old.len() as u32 {
        at.push(n);
        n += match old.get(i) {
            Some(Instruction::EmitRaw(_)) => 2,
            _ => 1,
        };
    }
    at.push(n);
    let map = |t: &u32| at.get(*t as usize).copied().unwrap_or(n);
    let mut new = Instructions::new(old.name(), old.source());
    for i in 0..old.len() as u32 {
        let Some(ins) = old.get(i) else { break };
        let mut put = |x: Instruction<'s>| match (old.get_span(i), old.get_line(i)) {
            (Some(span), _) => new.add_with_span(x, span),
            (None, Some(line)) => new.add_with_line(x, line as u16),
            _ => new.add(x),
        };
        match ins {
            Instruction::EmitRaw(s) => {
                put(Instruction::LoadConst(Value::from_safe_string(
                    s.to_string(),
                )));
                put(Instruction::Emit);
                continue;
            }
            Instruction::StringConcat => put(Instruction::CallFunction(CONCAT, Some(2))),
            Instruction::Add => put(Instruction::CallFunction(ADD, Some(2))),
            Instruction::Mul => put(Instruction::CallFunction(MUL, Some(2))),
            Instruction::Slice => put(Instruction::CallFunction(SLICE, Some(4))),
            Instruction::Jump(t) => put(Instruction::Jump(map(t))),
            Instruction::JumpIfFalse(t) => put(Instruction::JumpIfFalse(map(t))),
            Instruction::JumpIfFalseOrPop(t) => put(Instruction::JumpIfFalseOrPop(map(t))),
            Instruction::JumpIfTrueOrPop(t) => put(Instruction::JumpIfTrueOrPop(map(t))),
            Instruction::Iterate(t) => put(Instruction::Iterate(map(t))),
            Instruction::BuildMacro(name, t, flags) => {
                put(Instruction::BuildMacro(name, map(t), *flags))
            }
            other => put(other.clone()),
        };
    }
    new
}

/// The blocks of a compiled template, rewritten.
pub(crate) fn rewrite_blocks<'s>(
    blocks: &BTreeMap<&'s str, Instructions<'s>>,
) -> BTreeMap<&'s str, Instructions<'s>> {
    blocks.iter().map(|(k, v)| (*k, rewrite(v))).collect()
}

/// The operators' own semantics, for the cases the checked functions pass on
/// (numbers, strings of checked size): expressions of a plain environment.
fn op(which: &'static str) -> &'static Expression<'static, 'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    static OPS: OnceLock<[Expression<'static, 'static>; 3]> = OnceLock::new();
    let env = ENV.get_or_init(Environment::new);
    let ops = OPS.get_or_init(|| {
        ["a + b", "a * b", "a[b:c:d]"].map(|e| env.compile_expression(e).expect("valid expression"))
    });
    match which {
        "+" => &ops[0],
        "*" => &ops[1],
        _ => &ops[2],
    }
}

fn is_seq(v: &Value) -> bool {
    matches!(v.kind(), ValueKind::Seq | ValueKind::Iterable)
}

/// A sequence's items, charged 16 bytes per item (a list slot) beyond what
/// is already counted, refused past the budget.
fn items(b: &Budget, v: &Value, times: u128) -> Result<Vec<Value>, Error> {
    let len = v.len().map(|l| l as u128);
    if let Some(len) = len {
        b.charge(len.saturating_mul(times).saturating_mul(16))?;
    }
    let mut out = Vec::new();
    for x in v.try_iter()? {
        if len.is_none() {
            b.charge(16)?;
        }
        out.push(x);
    }
    Ok(out)
}

/// Register the checked operators, filters, methods and formatter on `env`.
pub(crate) fn install(env: &mut Environment<'_>, budget: &Arc<Budget>) {
    let b = budget.clone();
    env.add_function(CONCAT, move |x: Value, y: Value| -> Result<Value, Error> {
        let s = b.sizes(&[x.clone(), y.clone()])?;
        b.charge(s.bytes)?;
        Ok(Value::from(format!("{x}{y}")))
    });
    let b = budget.clone();
    env.add_function(ADD, move |x: Value, y: Value| -> Result<Value, Error> {
        if is_seq(&x) && is_seq(&y) {
            let mut v = items(&b, &x, 1)?;
            v.extend(items(&b, &y, 1)?);
            return Ok(Value::from(v));
        }
        if x.kind() == ValueKind::String || y.kind() == ValueKind::String {
            b.charge(b.sizes(&[x.clone(), y.clone()])?.bytes)?;
        }
        op("+").eval(minijinja::context! { a => x, b => y })
    });
    let b = budget.clone();
    env.add_function(MUL, move |x: Value, y: Value| -> Result<Value, Error> {
        let (v, n) = if x.kind() == ValueKind::Number {
            (&y, &x)
        } else {
            (&x, &y)
        };
        if v.kind() == ValueKind::String || is_seq(v) {
            let times = n.as_usize().map_or(0, |n| n as u128);
            if is_seq(v) {
                let once = items(&b, v, times)?;
                if once.is_empty() {
                    return Ok(Value::from(once));
                }
                let mut out = Vec::with_capacity(once.len().saturating_mul(times as usize));
                for _ in 0..times {
                    out.extend(once.iter().cloned());
                }
                return Ok(Value::from(out));
            }
            b.charge(b.size(v)?.bytes.saturating_mul(times))?;
        }
        op("*").eval(minijinja::context! { a => x, b => y })
    });
    let b = budget.clone();
    env.add_function(
        SLICE,
        move |x: Value, start: Value, stop: Value, step: Value| -> Result<Value, Error> {
            b.charge(b.size(&x)?.bytes)?;
            op("[:]").eval(minijinja::context! { a => x, b => start, c => stop, d => step })
        },
    );

    // Output (and everything captured) through the formatter.
    let b = budget.clone();
    env.set_formatter(move |out, state, value| {
        b.charge(b.size(value)?.bytes)?;
        minijinja::escape_formatter(out, state, value)
    });

    // debug() formats the whole state: not for a downloaded template.
    env.add_function("debug", || -> Result<Value, Error> {
        Err(Error::new(
            ErrorKind::InvalidOperation,
            "debug() is not available in chat templates",
        ))
    });

    install_filters(env, budget);

    let b = budget.clone();
    env.set_unknown_method_callback(move |state, value, method, args| {
        let len = |v: &Value| v.as_str().map_or(0, str::len) as u128;
        let s = len(value);
        let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
        let pre = match method {
            "upper" | "lower" | "title" | "capitalize" => 3 * s,
            "replace" => s + (s + 1) * len(&arg(1)),
            "join" => {
                let items = b.size(&arg(0))?;
                items.bytes + items.items.saturating_mul(s)
            }
            "format" => s + 6 * b.sizes(args)?.bytes + digit_sum(value.as_str().unwrap_or("")),
            _ => 0,
        };
        b.charge(pre)?;
        let r = minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)?;
        b.charge(b.size(&r)?.bytes)?;
        Ok(r)
    });
}
