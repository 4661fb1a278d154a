//! `raft_scan`, returning its rows the way a plain SELECT does. pgrx's set-returning functions
//! return one row per call, and each row was copied from SPI into Rust and back into a tuple:
//! a 100-key prefix cost 2.4× the same indexed SELECT (bench/scale.sh, 1,000,000 keys). Here
//! the kept plan's executor writes straight into the function's result tuplestore (SPI's
//! `dest`, as PL/pgSQL's RETURN QUERY does), so a scan costs the SELECT and one tuple copy.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CString;

use pgrx::fcinfo::pg_getarg;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode as Code;
use raft_kv_core::command::prefix_end;

use crate::history_api::{SCAN_FROM_SQL, SCAN_RANGE_SQL};
use crate::sql_boundary::{consistency, raise, read_barrier, require_preload, Consistency};

extension_sql!(
    r#"
-- Every key starting with prefix (all keys for ''), ordered by key, with its metadata (etcd's
-- mod_revision, create_revision and version), with the same consistency and at_revision
-- choices as raft_get. (Declared here: the function is written against the C calling
-- convention, to return its rows in one tuplestore.)
CREATE FUNCTION "raft_scan"(
    "prefix" TEXT,
    "consistency" TEXT DEFAULT 'linearizable',
    "at_revision" bigint DEFAULT NULL
) RETURNS TABLE (
    "key" TEXT,
    "value" TEXT,
    "mod_revision" bigint,
    "create_revision" bigint,
    "version" bigint
)
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'raft_scan_wrapper';
"#,
    name = "raft_scan",
);

// Not in pgrx's bindings (executor/tstoreReceiver.h). It only fills in the receiver's fields.
extern "C" {
    fn SetTuplestoreDestReceiverParams(
        receiver: *mut pg_sys::DestReceiver,
        store: *mut pg_sys::Tuplestorestate,
        context: pg_sys::MemoryContext,
        detoast: bool,
        target: pg_sys::TupleDesc,
        map_failure_msg: *const std::ffi::c_char,
    );
}

/// A plan kept with `SPI_keepplan`: it lives in CacheMemoryContext for the backend's life.
struct KeptPlan(pg_sys::SPIPlanPtr);

thread_local! {
    static PLANS: RefCell<HashMap<&'static str, KeptPlan>> = RefCell::default();
}

#[no_mangle]
#[doc(hidden)]
pub extern "C" fn pg_finfo_raft_scan_wrapper() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// The C entry point of `raft_scan(prefix, consistency, at_revision)`.
///
/// # Safety
/// Called by Postgres's function manager with a valid `fcinfo` for the signature above.
#[pg_guard]
#[no_mangle]
#[doc(hidden)]
pub unsafe extern "C-unwind" fn raft_scan_wrapper(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    require_preload();
    // SAFETY: the three arguments are text, text and bigint, as declared.
    let (prefix, c, at) =
        unsafe { (pg_getarg::<&str>(fcinfo, 0), pg_getarg::<&str>(fcinfo, 1), pg_getarg::<i64>(fcinfo, 2)) };
    let Some(prefix) = prefix else {
        raise(Code::ERRCODE_NULL_VALUE_NOT_ALLOWED, "raft_kv prefix must not be NULL".into(), None, None)
    };
    let at = crate::history_api::revision_arg("at_revision", at);
    let c = consistency(c);
    // Before the barrier: a caller that cannot take a table's rows finds out without waiting.
    // SAFETY: fcinfo is valid; this errors unless the caller accepts a materialized set, and
    // makes the tuplestore and its descriptor in the query's memory.
    unsafe { pg_sys::InitMaterializedSRF(fcinfo, 0) };
    read_barrier(c);
    // SAFETY: InitMaterializedSRF set resultinfo to a ReturnSetInfo with both filled in.
    let rsinfo = unsafe { &mut *((*fcinfo).resultinfo as *mut pg_sys::ReturnSetInfo) };
    match at {
        None => scan_into(rsinfo, prefix, c == Consistency::Linearizable),
        Some(_) => {
            for (key, r) in crate::history_api::scan_at(prefix, at) {
                let mut values = [
                    key.as_str().into_datum(),
                    r.value.as_str().into_datum(),
                    (r.mod_revision as i64).into_datum(),
                    (r.create_revision as i64).into_datum(),
                    (r.version as i64).into_datum(),
                ]
                .map(|d| d.unwrap_or(pg_sys::Datum::from(0)));
                let mut nulls = [false; 5];
                // SAFETY: five values of the result's five column types.
                unsafe {
                    pg_sys::tuplestore_putvalues(
                        rsinfo.setResult,
                        rsinfo.setDesc,
                        values.as_mut_ptr(),
                        nulls.as_mut_ptr(),
                    )
                };
            }
        }
    }
    pg_sys::Datum::from(0)
}

/// Runs the kept range plan with its executor writing into the result tuplestore: under a new
/// snapshot when `fresh` (after a barrier: the statement's could miss what it waited for),
/// under the calling statement's otherwise, as a plain SELECT in it would read.
fn scan_into(rsinfo: &mut pg_sys::ReturnSetInfo, prefix: &str, fresh: bool) {
    let upper = prefix_end(prefix);
    let (sql, args): (&'static str, Vec<&str>) = match &upper {
        Some(u) => (SCAN_RANGE_SQL, vec![prefix, u.as_str()]),
        None => (SCAN_FROM_SQL, vec![prefix]),
    };
    Spi::connect(|_| {
        let plan = plan_for(sql, args.len());
        // SAFETY: inside an SPI connection. The parameter list and its text values are made in
        // the SPI procedure's memory, freed by SPI_finish; the receiver copies each row (its
        // toasted values fetched) into the tuplestore, which lives in the query's memory, and
        // checks the rows against the declared result type. The pushed snapshot is popped
        // before returning; an ERROR in between aborts the transaction, which clears it.
        unsafe {
            let params = pg_sys::makeParamList(args.len() as i32);
            let slots = (*params).params.as_mut_slice(args.len());
            for (p, a) in slots.iter_mut().zip(&args) {
                p.value = a.into_datum().unwrap_or(pg_sys::Datum::from(0));
                p.isnull = false;
                p.pflags = pg_sys::PARAM_FLAG_CONST as u16;
                p.ptype = pg_sys::TEXTOID;
            }
            let dest = pg_sys::CreateDestReceiver(pg_sys::CommandDest::DestTuplestore);
            SetTuplestoreDestReceiverParams(
                dest,
                rsinfo.setResult,
                (*rsinfo.econtext).ecxt_per_query_memory,
                true,
                rsinfo.setDesc,
                c"raft_kv: raft_scan's query does not match its result type".as_ptr(),
            );
            let options = pg_sys::SPIExecuteOptions {
                params,
                read_only: true,
                allow_nonatomic: false,
                must_return_tuples: false,
                tcount: 0,
                dest,
                owner: std::ptr::null_mut(),
            };
            if fresh {
                pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
            }
            let rc = pg_sys::SPI_execute_plan_extended(plan, &options);
            if fresh {
                pg_sys::PopActiveSnapshot();
            }
            if rc < 0 {
                raise(Code::ERRCODE_INTERNAL_ERROR, format!("raft_kv: reading failed: SPI error {rc}"), None, None);
            }
        }
    })
}

/// This backend's kept plan for `sql` (text parameters), made on first use. Postgres re-plans
/// a kept plan itself when the table changes.
fn plan_for(sql: &'static str, nargs: usize) -> pg_sys::SPIPlanPtr {
    PLANS.with_borrow_mut(|plans| {
        plans
            .entry(sql)
            .or_insert_with(|| {
                let text = CString::new(sql).expect("no NUL in a constant");
                let mut types = vec![pg_sys::TEXTOID; nargs];
                // SAFETY: inside an SPI connection (the caller's); the plan is checked, then
                // kept, which moves it out of the procedure's memory.
                unsafe {
                    let plan = pg_sys::SPI_prepare(text.as_ptr(), nargs as i32, types.as_mut_ptr());
                    let rc = std::ptr::addr_of!(pg_sys::SPI_result).read();
                    if plan.is_null() || pg_sys::SPI_keepplan(plan) != 0 {
                        raise(
                            Code::ERRCODE_INTERNAL_ERROR,
                            format!("raft_kv: preparing a scan failed: SPI error {rc}"),
                            None,
                            None,
                        );
                    }
                    KeptPlan(plan)
                }
            })
            .0
    })
}
