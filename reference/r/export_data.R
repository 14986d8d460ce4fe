## Export real mixed-model data sets shipped with R packages to CSV.
##
##   OUT=examples/data Rscript reference/r/export_data.R
##
## Writes into $OUT (default examples/data):
##   sleepstudy.csv   lme4::sleepstudy   Reaction, Days, Subject
##   penicillin.csv   lme4::Penicillin   diameter, plate, sample
##   grouseticks.csv  lme4::grouseticks  INDEX, TICKS, BROOD, HEIGHT, YEAR, LOCATION, HEIGHT_scaled
##                    (HEIGHT_scaled = as.numeric(scale(HEIGHT)), what scale(HEIGHT) in a formula computes)
##   salamanders.csv  glmmTMB::Salamanders  site, mined, cover, sample, DOP, Wtemp, DOY, spp, count
##   verbagg.csv      lme4::VerbAgg      r2, Anger, Gender, btype, situ, mode, item, id
##                    (the binary response r2 only; the 3-level ordered resp is not exported)
##   insteval.csv     lme4::InstEval     s, d, dept, service, studage, lectage, y
## Factors are written as their labels; rows keep the order of the R data set.
## Non-integer numbers are written with the shortest representation (15, 16 or 17 significant digits)
## that reads back to the identical double, so a refit from the CSV is bit-for-bit the same data.
## The level order of every factor (needed to reproduce R's contrasts and ranef order) is written to
## factor_levels.json next to the CSVs.
suppressPackageStartupMessages({library(lme4); library(glmmTMB); library(jsonlite)})

out <- Sys.getenv("OUT", "examples/data")
dir.create(out, showWarnings = FALSE, recursive = TRUE)

## shortest decimal string that round-trips to the same double
exact_chr <- function(x) {
  vapply(x, function(v) {
    if (is.na(v)) return("NA")
    for (d in 15:17) {
      s <- formatC(v, digits = d, format = "g")
      if (as.numeric(s) == v) return(trimws(s))
    }
    trimws(formatC(v, digits = 17, format = "g"))
  }, character(1), USE.NAMES = FALSE)
}

write_exact <- function(df, file) {
  df <- as.data.frame(df)
  for (nm in names(df)) {
    x <- df[[nm]]
    if (is.factor(x)) {
      df[[nm]] <- as.character(x)
    } else if (is.double(x) && any(x != round(x), na.rm = TRUE)) {
      df[[nm]] <- exact_chr(x)
    }
  }
  ## quote = FALSE would also work (no label contains a comma), but keep write.csv's quoting of strings;
  ## numeric columns converted above are written unquoted.
  num_cols <- which(vapply(names(df), function(nm) !is.character(df[[nm]]) ||
                             nm %in% conv[[file]], logical(1)))
  write.csv(df, file.path(out, file), row.names = FALSE,
            quote = setdiff(seq_along(df), num_cols))
  d2 <- read.csv(file.path(out, file))
  cat(sprintf("%-18s %4d rows x %d cols -> %s\n", file, nrow(df), ncol(df), file.path(out, file)))
  invisible(d2)
}

sleep <- lme4::sleepstudy[, c("Reaction", "Days", "Subject")]
pen <- lme4::Penicillin[, c("diameter", "plate", "sample")]
gt <- lme4::grouseticks[, c("INDEX", "TICKS", "BROOD", "HEIGHT", "YEAR", "LOCATION")]
gt$HEIGHT_scaled <- as.numeric(scale(gt$HEIGHT))
sal <- glmmTMB::Salamanders[, c("site", "mined", "cover", "sample", "DOP", "Wtemp", "DOY", "spp", "count")]
va <- lme4::VerbAgg[, c("r2", "Anger", "Gender", "btype", "situ", "mode", "item", "id")]
ie <- lme4::InstEval[, c("s", "d", "dept", "service", "studage", "lectage", "y")]

## columns turned from double into exact strings must be written unquoted
conv <- list(
  sleepstudy.csv = "Reaction",
  penicillin.csv = character(0),
  grouseticks.csv = "HEIGHT_scaled",
  salamanders.csv = c("cover", "DOP", "Wtemp", "DOY"),
  verbagg.csv = character(0),
  insteval.csv = character(0))

sets <- list(sleepstudy.csv = sleep, penicillin.csv = pen, grouseticks.csv = gt, salamanders.csv = sal,
             verbagg.csv = va, insteval.csv = ie)
for (f in names(sets)) {
  d2 <- write_exact(sets[[f]], f)
  ## check: every column reads back identical (factors as labels)
  orig <- sets[[f]]
  for (nm in names(orig)) {
    a <- orig[[nm]]; b <- d2[[nm]]
    ok <- if (is.factor(a)) identical(as.character(a), as.character(b)) else identical(as.numeric(a), as.numeric(b))
    if (!ok) stop(sprintf("%s: column %s does not read back identically", f, nm))
  }
}

## factor level order as R has it (incl. cbpp.csv, written earlier by reference/r/cbpp.R from lme4::cbpp)
lev <- list(
  sleepstudy = list(Subject = levels(sleep$Subject)),
  penicillin = list(plate = levels(pen$plate), sample = levels(pen$sample)),
  grouseticks = list(INDEX = levels(gt$INDEX), BROOD = levels(gt$BROOD), YEAR = levels(gt$YEAR),
                     LOCATION = levels(gt$LOCATION)),
  salamanders = list(site = levels(sal$site), mined = levels(sal$mined), spp = levels(sal$spp)),
  cbpp = list(herd = levels(lme4::cbpp$herd), period = levels(lme4::cbpp$period)),
  verbagg = lapply(va[vapply(va, is.factor, logical(1))], levels),
  insteval = lapply(ie[vapply(ie, is.factor, logical(1))], levels))
## Salamanders$site is an ordered factor in glmmTMB; InstEval's studage and lectage are ordered in lme4
ordered_factors <- list(salamanders = "site", insteval = c("studage", "lectage"))
stopifnot(identical(names(ie)[vapply(ie, is.ordered, logical(1))], ordered_factors$insteval),
          !any(vapply(va, is.ordered, logical(1))))
writeLines(toJSON(list(levels = lev, ordered = ordered_factors,
                       note = paste("Level order of each factor in the R data set; for fixed-effect factors",
                                    "the first level is the treatment-contrast baseline.")),
                  auto_unbox = TRUE, pretty = TRUE),
           file.path(out, "factor_levels.json"))
cat("factor_levels.json written\n")
