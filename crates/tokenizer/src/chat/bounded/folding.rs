//! Constant folding at compile time, bounded: minijinja's code generator evaluates
//! constant expressions before any budget applies, so the parsed template is walked
//! (nothing evaluated) and refused when folding would make more than
//! [`CONST_FOLD_LIMIT`] bytes.

use super::*;

/// Refuse a template whose constant expressions would make more than
/// [`CONST_FOLD_LIMIT`] bytes when minijinja's code generator folds them
/// (`{{ 'x' * 100000000 ~ 'x' * 100000000 }}` is evaluated at compile time,
/// before any budget applies). Walks the parsed template without evaluating
/// anything.
pub(crate) fn check_constant_folding(stmt: &ast::Stmt<'_>) -> Result<(), String> {
    let mut total = 0u128;
    stmt_walk(stmt, &mut total);
    if total > CONST_FOLD_LIMIT {
        return Err(format!(
            "its constant expressions would make about {total} bytes when compiled \
             (more than {CONST_FOLD_LIMIT}); the template is not a usable chat template"
        ));
    }
    Ok(())
}

/// Folded value of a constant expression: its display size and, for a
/// number, its value.
#[derive(Clone, Copy)]
struct Folded {
    size: u128,
    num: Option<f64>,
}

/// What folding `e` makes, when `e` is foldable (minijinja's `Expr::as_const`
/// succeeds structurally); every foldable node's size is added to `total`.
fn fold(e: &ast::Expr<'_>, total: &mut u128) -> Option<Folded> {
    use ast::Expr as E;
    let r = match e {
        E::Const(c) => {
            let v = &c.value;
            Some(Folded {
                size: size_of(v, usize::MAX).map_or(u128::MAX, |s| s.bytes),
                num: (v.kind() == ValueKind::Number)
                    .then(|| v.to_string().parse::<f64>().ok())
                    .flatten(),
            })
        }
        E::List(l) => {
            let all = l.items.iter().all(|x| matches!(x, E::Const(_)));
            let s: u128 = l
                .items
                .iter()
                .filter_map(|x| fold(x, &mut 0))
                .map(|f| f.size + 2)
                .sum();
            all.then_some(Folded {
                size: s + 2,
                num: None,
            })
        }
        E::Map(m) => {
            let all = m
                .keys
                .iter()
                .chain(&m.values)
                .all(|x| matches!(x, E::Const(_)));
            let s: u128 = m
                .keys
                .iter()
                .chain(&m.values)
                .filter_map(|x| fold(x, &mut 0))
                .map(|f| f.size + 2)
                .sum();
            all.then_some(Folded {
                size: s + 2,
                num: None,
            })
        }
        E::UnaryOp(u) => {
            let x = fold(&u.expr, total);
            match u.op {
                ast::UnaryOpKind::Not => x.map(|_| Folded { size: 5, num: None }),
                ast::UnaryOpKind::Neg => x.map(|f| Folded {
                    size: f.size,
                    num: f.num.map(|n| -n),
                }),
            }
        }
        E::BinOp(o) => {
            let (l, r) = (fold(&o.left, total), fold(&o.right, total));
            let (l, r) = (l?, r?);
            use ast::BinOpKind as K;
            let num = match (l.num, r.num) {
                (Some(a), Some(b)) => match o.op {
                    K::Add => Some(a + b),
                    K::Sub => Some(a - b),
                    K::Mul => Some(a * b),
                    K::Div | K::FloorDiv => Some(a / b),
                    K::Rem => Some(a % b),
                    K::Pow => Some(a.powf(b)),
                    _ => None,
                },
                _ => None,
            };
            let size = match (o.op, num) {
                (_, Some(_)) => 32,
                (K::Mul, None) => {
                    let (s, n) = match (l.num, r.num) {
                        (Some(n), _) => (r.size, n),
                        (_, Some(n)) => (l.size, n),
                        _ => (l.size.max(r.size), 1.0),
                    };
                    // a repetition count that is not a plain number: assume the worst
                    let n = if n.is_finite() && n >= 0.0 {
                        n.min(1e30) as u128
                    } else {
                        0
                    };
                    s.saturating_mul(n)
                }
                (K::Add | K::Concat | K::ScAnd | K::ScOr, None) => l.size.saturating_add(r.size),
                _ => 5,
            };
            Some(Folded { size, num })
        }
        E::Compare(c) => {
            let mut ok = fold(&c.expr, total).is_some();
            for x in &c.ops {
                ok &= fold(&x.expr, total).is_some();
            }
            ok.then_some(Folded { size: 5, num: None })
        }
        E::Var(_) => None,
        E::Slice(s) => {
            fold(&s.expr, total);
            for x in [&s.start, &s.stop, &s.step].into_iter().flatten() {
                fold(x, total);
            }
            None
        }
        E::IfExpr(i) => {
            fold(&i.test_expr, total);
            fold(&i.true_expr, total);
            if let Some(x) = &i.false_expr {
                fold(x, total);
            }
            None
        }
        E::Filter(f) => {
            if let Some(x) = &f.expr {
                fold(x, total);
            }
            args_walk(&f.args, total);
            None
        }
        E::Test(t) => {
            fold(&t.expr, total);
            args_walk(&t.args, total);
            None
        }
        E::GetAttr(g) => {
            fold(&g.expr, total);
            None
        }
        E::GetItem(g) => {
            fold(&g.expr, total);
            fold(&g.subscript_expr, total);
            None
        }
        E::Call(c) => {
            fold(&c.expr, total);
            args_walk(&c.args, total);
            None
        }
    };
    if let Some(f) = r {
        *total = total.saturating_add(f.size);
    }
    r
}

fn args_walk(args: &[ast::CallArg<'_>], total: &mut u128) {
    for a in args {
        match a {
            ast::CallArg::Pos(x)
            | ast::CallArg::Kwarg(_, x)
            | ast::CallArg::PosSplat(x)
            | ast::CallArg::KwargSplat(x) => {
                fold(x, total);
            }
        }
    }
}

fn body_walk(body: &[ast::Stmt<'_>], total: &mut u128) {
    for s in body {
        stmt_walk(s, total);
    }
}

fn stmt_walk(s: &ast::Stmt<'_>, total: &mut u128) {
    use ast::Stmt as S;
    let mut e = |x: &ast::Expr<'_>| {
        fold(x, total);
    };
    match s {
        S::Template(t) => body_walk(&t.children, total),
        S::EmitExpr(x) => e(&x.expr),
        S::EmitRaw(_) | S::Continue(_) | S::Break(_) => {}
        S::ForLoop(f) => {
            e(&f.target);
            e(&f.iter);
            if let Some(x) = &f.filter_expr {
                e(x);
            }
            body_walk(&f.body, total);
            body_walk(&f.else_body, total);
        }
        S::IfCond(c) => {
            e(&c.expr);
            body_walk(&c.true_body, total);
            body_walk(&c.false_body, total);
        }
        S::WithBlock(w) => {
            for (a, b) in &w.assignments {
                e(a);
                e(b);
            }
            body_walk(&w.body, total);
        }
        S::Set(x) => {
            e(&x.target);
            e(&x.expr);
        }
        S::SetBlock(x) => {
            e(&x.target);
            if let Some(f) = &x.filter {
                e(f);
            }
            body_walk(&x.body, total);
        }
        S::AutoEscape(a) => {
            e(&a.enabled);
            body_walk(&a.body, total);
        }
        S::FilterBlock(f) => {
            e(&f.filter);
            body_walk(&f.body, total);
        }
        S::Block(b) => body_walk(&b.body, total),
        S::Import(i) => {
            e(&i.expr);
            e(&i.name);
        }
        S::FromImport(i) => {
            e(&i.expr);
            for (a, b) in &i.names {
                e(a);
                if let Some(b) = b {
                    e(b);
                }
            }
        }
        S::Extends(x) => e(&x.name),
        S::Include(x) => e(&x.name),
        S::Macro(m) => {
            for x in m.args.iter().chain(&m.defaults) {
                e(x);
            }
            body_walk(&m.body, total);
        }
        S::CallBlock(c) => {
            fold(&c.call.expr, total);
            args_walk(&c.call.args, total);
            for x in c.macro_decl.args.iter().chain(&c.macro_decl.defaults) {
                fold(x, total);
            }
            body_walk(&c.macro_decl.body, total);
        }
        S::Do(d) => {
            fold(&d.call.expr, total);
            args_walk(&d.call.args, total);
        }
    }
}

/// Parse `source` as the environment will and refuse runaway constant folding.
pub(crate) fn precheck(source: &str, name: &str) -> Result<(), Error> {
    let ws = machinery::WhitespaceConfig {
        keep_trailing_newline: false,
        lstrip_blocks: true,
        trim_blocks: true,
    };
    let stmt = machinery::parse(source, name, Default::default(), ws)?;
    check_constant_folding(&stmt).map_err(|m| Error::new(ErrorKind::InvalidOperation, m))
}
