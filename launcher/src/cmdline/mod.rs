//! STUB: replaced by the parser work. API contract only.
use std::ffi::OsString;

#[derive(Debug, thiserror::Error)]
pub enum CmdLineError {
    #[error("-readconfig is not supported under qemu-liveupgrade")]
    ReadConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Opt { pub spelling: OsString, pub name: String, pub arg: Option<OsString> }

#[derive(Debug, Clone, PartialEq)]
pub enum Item { Opt(Opt), Positional(OsString) }

#[derive(Debug, Clone, PartialEq, Default)]
pub struct CmdLine { pub items: Vec<Item> }

impl CmdLine {
    pub fn parse(_args: &[OsString]) -> Result<CmdLine, CmdLineError> { todo!() }
    pub fn to_args(&self) -> Vec<OsString> { todo!() }
    pub fn is_info_only(&self) -> bool { todo!() }
}
